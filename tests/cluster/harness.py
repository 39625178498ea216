"""A real multi-node Ray cluster on one machine, for end-to-end tests of multi-node behaviour.

- The S3 server (the shared storage of a multi-node run) is the session's `s3_server` fixture
  (tests/conftest.py); a Cluster given its `env` relays its port into the namespace.
- `Cluster`: a head (`--num-cpus 0`, the `TRAIN_DRIVER` resource) and N one-CPU worker nodes
  (custom resources `node1`..`nodeN`), each a `ray start --block` subprocess in its own mount
  namespace. A worker node gets a private tmpfs over each of `private_dirs`: a file it writes
  there is invisible to the host and to the other nodes (on one machine all nodes otherwise share
  one file system, and a "local" path looks shared). Killing a node = SIGKILL to every process in
  its mount namespace.
- `run_in_fresh_host`: run a command (a driver) as on another machine: own mount and UTS
  namespaces, a tmpfs over given folders, another host name.

Loopback only. `--node-ip-address 127.0.0.1` is NOT enough: `ray start` rewrites 127.0.0.1 to the
machine's own address (`resolve_ip_for_localhost`), and the GCS, raylet and agents bind
0.0.0.0 whatever the node address. So every node runs in one private network namespace that has
nothing but `lo` (`unshare -n`, `ip link set lo up`, held open by a `sleep` process): Ray finds
no external address and uses 127.0.0.1, and no port is reachable from outside, nor clashes with
another Ray instance on the machine. The cluster's processes reach a host port (the S3 server)
through a relay that listens on the same port inside the namespace (`forward_ports`). A driver
runs inside with `cluster.command([...])`. The test process itself never calls `ray.init`
(other tests in the session use a local Ray instance): it inspects the cluster through
subprocesses and /proc.

Needs root (namespaces, tmpfs): tests call `require_namespaces()` first, which skips where that
is not permitted, or fails when `CI=true`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

HOST = "127.0.0.1"
BUCKET = "raypo-test"
RAY = str(Path(sys.executable).with_name("ray"))  # the `ray` CLI of this interpreter's env

# Environment of every node and driver: no token auth (2.59+ default), no telemetry, and faster
# node-death detection (GCS health checks every second: a killed node is dead in ~5 s, not ~15 s).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_initial_delay_ms": "1000"}


# --- namespaces and processes -------------------------------------------------------------------

def namespaces_permitted() -> tuple[bool, str]:
    """(True, "") when this process may create mount and network namespaces and mount a tmpfs."""
    try:
        done = subprocess.run(
            ["unshare", "-m", "-n", "-u", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs tmpfs /mnt && ip link set lo up && hostname probe"],
            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"unshare not usable: {e}"
    if done.returncode != 0:
        return False, f"namespaces not permitted (needs root): {done.stderr.strip()}"
    return True, ""


def require_namespaces() -> None:
    """Skip the calling test where namespaces are not permitted; fail instead when CI=true."""
    ok, reason = namespaces_permitted()
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def namespace(pid: int, kind: str = "mnt") -> str | None:
    """A process's namespace of `kind` ('mnt:[inode]'), None once the process is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_in_ns(ns: str, kind: str = "mnt") -> list[int]:
    """Every live process in namespace `ns` (as `namespace` gives it)."""
    return [pid for pid in _all_pids() if namespace(pid, kind) == ns]


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _kill_all(pids_fn: Callable[[], list[int]], grace: float = 0.0,
              timeout: float = 15.0) -> None:
    """Kill `pids_fn()` until it is empty: SIGTERM and `grace` seconds, then SIGKILL, repeated
    (a dying raylet may still fork a worker)."""
    if grace:
        for pid in pids_fn():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids_fn() and time.monotonic() < deadline:
            time.sleep(0.2)
    deadline = time.monotonic() + timeout
    while pids := pids_fn():
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes survive SIGKILL: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _wait_for_ns(proc: subprocess.Popen, kind: str, log: Path | None = None) -> str:
    """The `kind` namespace of `proc` once `unshare` has made it (unshare and sh exec in place,
    so proc.pid becomes the namespace's first process)."""
    own, deadline = namespace(os.getpid(), kind), time.monotonic() + 10
    while (ns := namespace(proc.pid, kind)) in (own, None):
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args} did not start (rc {proc.poll()}):\n{text}")
        time.sleep(0.05)
    return ns


def _tmpfs_script(dirs: Sequence[str | Path], then: str = "") -> str:
    """sh code: a tmpfs over each of `dirs`, then `then`, then exec the arguments ("$@")."""
    steps = [f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in dirs]
    return " && ".join([*steps, *([then] if then else []), 'exec "$@"'])


def run_in_fresh_host(cmd: Sequence[str], env: dict[str, str],
                      private_dirs: Sequence[str | Path] = (), hostname: str = "fresh-host",
                      timeout: float = 300.0, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` as on another machine: own mount and UTS namespaces, a tmpfs over each of
    `private_dirs` (created on the host first), host name `hostname`; output captured as text.
    For a driver of a `Cluster`, pass `cluster.command([...])` as `cmd`."""
    return subprocess.run(fresh_host_command(cmd, private_dirs, hostname), env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def fresh_host_command(cmd: Sequence[str], private_dirs: Sequence[str | Path] = (),
                       hostname: str = "fresh-host") -> list[str]:
    """The argv that runs `cmd` as `run_in_fresh_host` does (for a Popen the test kills)."""
    for d in private_dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
    script = _tmpfs_script(private_dirs, then=f"hostname {shlex.quote(hostname)}")
    return ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


# --- a TCP relay into a network namespace -------------------------------------------------------

CLONE_NEWNET = 0x40000000


def _socket_in_netns(netns: str) -> socket.socket:
    """A TCP socket of the network namespace at path `netns` (/proc/<pid>/ns/net). setns(2)
    runs in a throwaway thread: a socket keeps the namespace it was made in, this process's
    other threads stay in theirs."""
    made: dict = {}

    def make():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
            made["socket"] = socket.socket()
        except BaseException as e:  # re-raised in the caller
            made["error"] = e
        finally:
            os.close(fd)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["socket"]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Relay:
    """Listens on 127.0.0.1:`port` inside network namespace `netns` and forwards each
    connection to 127.0.0.1:`port` of this process's namespace (threads of this process)."""

    def __init__(self, netns: str, port: int):
        self.port, self.stopped = port, threading.Event()
        self.listener = _socket_in_netns(netns)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(64)
        self.listener.settimeout(0.2)  # to notice `close`
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True, name=f"relay-{port}").start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                inside, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            inside.settimeout(None)
            try:
                outside = socket.create_connection((HOST, self.port))
            except OSError:
                inside.close()
                continue
            self.sockets += [inside, outside]
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# --- S3 -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- the cluster --------------------------------------------------------------------------------

# Ports, all inside the cluster's own network namespace (so no clash with anything on the
# machine). Node i (0 = head) gets base + 100 * i + offset: no two nodes share a port (Ray's
# defaults would give every node dashboard agent port 52365 and the same worker-port range).
PORT_BASE, PORTS_PER_NODE = 20000, 100
NODE_PORTS = {"--object-manager-port": 0, "--node-manager-port": 1,
              "--dashboard-agent-listen-port": 2, "--dashboard-agent-grpc-port": 3,
              "--runtime-env-agent-port": 4, "--metrics-export-port": 5}
HEAD_PORTS = {"--port": 6, "--dashboard-port": 7, "--ray-client-server-port": 8}
WORKER_PORTS = (20, 99)  # offsets of the --min-worker-port/--max-worker-port range


def _port_args(k: int) -> list[str]:
    base = PORT_BASE + PORTS_PER_NODE * k
    ports = {**NODE_PORTS, **(HEAD_PORTS if k == 0 else {})}
    args = [x for flag, offset in ports.items() for x in (flag, str(base + offset))]
    return args + ["--min-worker-port", str(base + WORKER_PORTS[0]),
                   "--max-worker-port", str(base + WORKER_PORTS[1])]


# Lists the nodes from the GCS (run inside the namespace; the test process never joins a
# cluster). With want >= 0: waits until a head and exactly `want` worker nodes are alive.
_NODES_SCRIPT = r"""
import json, sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, client, nodes = time.monotonic() + timeout, None, None
while True:
    try:  # the GCS may not be up yet
        client = client or GcsClient(address=address)
        nodes = [{"node_id": info.node_id.hex(), "alive": info.state == GcsNodeInfo.ALIVE,
                  "head": info.is_head_node, "resources": dict(info.resources_total)}
                 for info in client.get_all_node_info(timeout=5).values()]
    except Exception as e:
        if time.monotonic() > deadline:
            raise
        print(repr(e), file=sys.stderr)
    alive = [n for n in nodes or [] if n["alive"]]
    workers = [n for n in alive if not n["head"]]
    if nodes is not None and (want < 0 or (len(alive) > len(workers) == want)):
        break
    if time.monotonic() > deadline:
        break
    time.sleep(0.5)
if nodes is None:
    sys.exit(f"no answer from the GCS at {address}")
print(json.dumps(nodes))
"""


@dataclass
class _Node:
    k: int  # 0 = head, 1..N = worker nodes
    proc: subprocess.Popen
    log: Path  # its `ray start` output
    ns: str = ""  # its mount namespace


class Cluster:
    """A head and `num_workers` worker nodes on 127.0.0.1 of a private network namespace, each
    node in its own mount namespace; worker nodes see a private tmpfs over each of
    `private_dirs` (absolute paths, created on the host). `env` (e.g. `s3_server.env`) goes to
    every node and driver; host ports in `forward_ports`, plus that of an `AWS_ENDPOINT_URL` on
    127.0.0.1 in `env`, are reachable from inside. A context manager: on exit (or a failed
    start) every process it started is killed."""

    def __init__(self, num_workers: int = 2, private_dirs: Sequence[str | Path] = (),
                 env: dict[str, str] | None = None, forward_ports: Sequence[int] = (),
                 object_store_mb: int = 100, start_timeout: float = 90.0):
        self.num_workers = num_workers
        self.private_dirs = [Path(d) for d in private_dirs]
        if not all(d.is_absolute() for d in self.private_dirs):
            raise ValueError(f"private_dirs must be absolute: {self.private_dirs}")
        self.env = dict(env or {})
        self.forward_ports = list(forward_ports)
        endpoint = urlparse(self.env.get("AWS_ENDPOINT_URL", ""))
        if endpoint.hostname == HOST and endpoint.port:
            self.forward_ports.append(endpoint.port)
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        # Short (Unix socket paths must stay under ~107 bytes) and private: this cluster's
        # session dir, logs and sockets; no node touches /tmp/ray. Every node gets it: a worker
        # node would default to the head's anyway (2.60 allows one per node). Removed on a clean
        # exit, kept after a failure.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="raypo-cluster-", dir="/tmp"))
        self.address = f"{HOST}:{PORT_BASE + HEAD_PORTS['--port']}"  # inside the namespace
        self.dashboard_url = f"http://{HOST}:{PORT_BASE + HEAD_PORTS['--dashboard-port']}"
        self._net: subprocess.Popen | None = None  # holds the network namespace open
        self._relays: list[_Relay] = []
        self._nodes: dict[int, _Node] = {}
        self._killed: set[int] = set()

    # life cycle

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None:  # kept after a failure: its logs
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    @property
    def netns(self) -> str:
        """Path of the cluster's network namespace."""
        assert self._net is not None, "cluster not started"
        return f"/proc/{self._net.pid}/ns/net"

    def command(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` run inside the cluster's network namespace (where `self.address` is)."""
        return ["nsenter", f"--net={self.netns}", "--", *cmd]

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver of this cluster, and of its nodes: os.environ, `env`,
        RAY_ENV. RAY_ADDRESS is never set: pass `--address`/`address=` `self.address`."""
        env = {**os.environ, **self.env, **RAY_ENV}
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self) -> None:
        for d in self.private_dirs:
            d.mkdir(parents=True, exist_ok=True)
        self._net = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            start_new_session=True)
        _wait_for_ns(self._net, "net")
        self._relays = [_Relay(self.netns, port) for port in self.forward_ports]
        self._spawn(0, ["--head", "--num-cpus", "0", "--resources", '{"TRAIN_DRIVER": 2}',
                        "--dashboard-host", HOST, "--include-dashboard", "true"])
        self.wait_for_nodes(0, timeout=self.start_timeout)
        # One at a time, each once the one before is registered: two worker nodes starting at
        # once time out on 2 cores.
        for k in range(1, self.num_workers + 1):
            self._spawn(k, ["--address", self.address, "--num-cpus", "1",
                            "--resources", json.dumps({f"node{k}": 1})])
            self.wait_for_nodes(k, timeout=self.start_timeout)

    def _spawn(self, k: int, args: list[str]) -> None:
        ray = [RAY, "start", *args, "--block", "--node-ip-address", HOST,
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
               "--object-store-memory", str(self.object_store_mb * 2**20), *_port_args(k)]
        mounts = _tmpfs_script(self.private_dirs if k else [])
        cmd = self.command(["unshare", "-m", "--propagation", "private",
                            "sh", "-c", mounts, "sh", *ray])
        log = self.temp_dir / f"node{k}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=self.driver_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._nodes[k] = node = _Node(k, proc, log)
        node.ns = _wait_for_ns(proc, "mnt", log)

    def stop(self) -> None:
        """Kill everything: each node's namespace (workers first, SIGTERM then SIGKILL), any
        process left with the temp dir on its command line, the relays, the namespace holder."""
        for node in sorted(self._nodes.values(), key=lambda n: -n.k):
            if node.ns:
                _kill_all(lambda ns=node.ns: pids_in_ns(ns), grace=2.0)
            with contextlib.suppress(ProcessLookupError):
                node.proc.kill()
            node.proc.wait()
        temp, me = str(self.temp_dir), os.getpid()
        _kill_all(lambda: [p for p in _all_pids() if p != me and temp in _cmdline(p)])
        for relay in self._relays:
            relay.close()
        if self._net is not None:
            net = namespace(self._net.pid, "net")
            self._net.kill()
            self._net.wait()
            if net:  # e.g. a driver a test left running inside
                _kill_all(lambda: [p for p in pids_in_ns(net, "net") if p != me])

    # inspection

    def nodes(self, want: int = -1, timeout: float = 0.0) -> list[dict]:
        """The GCS's node table: dicts of node_id, alive, head, resources. With want >= 0,
        first waits up to `timeout` s for a head and exactly `want` alive worker nodes."""
        done = subprocess.run(self.command([sys.executable, "-c", _NODES_SCRIPT, self.address,
                                            str(want), str(timeout)]),
                              env=self.driver_env(), capture_output=True, text=True,
                              timeout=timeout + 60)
        if done.returncode != 0:
            raise RuntimeError(f"listing nodes failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    @staticmethod
    def alive_workers(nodes: list[dict]) -> list[int]:
        """k of every alive worker node in `nodes` (from its `nodeK` resource), sorted."""
        return sorted(int(name[4:]) for n in nodes if n["alive"] and not n["head"]
                      for name in n["resources"] if name[:4] == "node" and name[4:].isdigit())

    def wait_for_nodes(self, n: int, timeout: float = 60.0) -> list[dict]:
        """Wait until a head and exactly `n` worker nodes are alive; the node table."""
        for node in self._nodes.values():
            if node.k not in self._killed and node.proc.poll() is not None:
                raise RuntimeError(f"node {node.k} exited:\n{self._tail(node.log)}")
        nodes = self.nodes(want=n, timeout=timeout)
        if not any(x["head"] and x["alive"] for x in nodes) or len(self.alive_workers(nodes)) != n:
            logs = "\n".join(f"--- node {k}:\n{self._tail(x.log)}" for k, x in self._nodes.items())
            raise TimeoutError(f"not {n} worker nodes alive after {timeout} s: {nodes}\n{logs}")
        return nodes

    def node_id(self, k: int) -> str:
        """The Ray node id (hex) of alive worker node k."""
        alive = [n for n in self.nodes() if n["alive"] and f"node{k}" in n["resources"]]
        return alive[0]["node_id"]

    def node_pids(self, k: int) -> list[int]:
        """Every live process of node k (0 = head): those in its mount namespace."""
        return pids_in_ns(self._nodes[k].ns)

    def kill_node(self, k: int) -> None:
        """SIGKILL every process of worker node k, as if its machine died."""
        self._killed.add(k)
        _kill_all(lambda: self.node_pids(k))
        self._nodes[k].proc.wait()

    def read_private(self, k: int, path: str | Path) -> bytes:
        """File `path` (absolute) as node k sees it, e.g. on its private disk, read through
        /proc/<pid>/root of one of its processes. FileNotFoundError when it has none."""
        for pid in self.node_pids(k):
            root = Path(f"/proc/{pid}/root")
            with contextlib.suppress(ProcessLookupError):
                os.stat(root)  # the process may have exited meanwhile
                return (root / Path(path).relative_to("/")).read_bytes()
        raise ProcessLookupError(f"node {k} has no live process")

    def logs(self) -> str:
        """The text of every Ray worker log (session_latest/logs/worker-*) of this cluster, then
        each node's `ray start` output: for failure messages."""
        files = sorted((self.temp_dir / "session_latest" / "logs").glob("worker-*"))
        files += sorted(self.temp_dir.glob("node*.log"))
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')}" for f in files)

    @staticmethod
    def _tail(path: Path, chars: int = 3000) -> str:
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

"""Can every node of the cluster reach the report folder? Checked before any trial, because a
trial on a node that cannot writes its checkpoints and its model where nobody will find them.

The check is Ray's own, done early: the driver writes a marker into the report folder
(`.raypo-storage`), then a task on each alive node reads it back. A local folder on the head
of a multi-node cluster fails it (each node has its own disk), as does a bucket that a worker
node has no credentials for. A cluster that is only its head for now (an autoscaler that adds
workers later, `min_workers: 0`) cannot be checked that way: a local folder that is not on a
network file system is then a warning, and each trial checks the marker from its own node
before it trains (`check_marker`): the first that cannot see it stops the search with the same
message (raypo.search.recorder), rather than the search going on without checkpoints or models.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from raypo.search.space import SpaceError
from raypo.storage import RemotePath, location, on_network_fs

MARKER = ".raypo-storage"
TIMEOUT_S = 120  # for the tasks to start on every node and read the marker


class StorageUnreachable(SpaceError):
    """A node of the cluster cannot reach the report folder: exit 2 before (or instead of)
    training, with the message of `message()`."""


def message(directory, node: str, why: str) -> str:
    how = ("give every node the bucket's credentials (on AWS, an IamInstanceProfile on every "
           "node type: see cluster.yaml)" if isinstance(directory, RemotePath) else
           "put the reports on storage every node sees: --reports s3://BUCKET/PREFIX (or "
           "gs://...), or a folder on an NFS/EFS mount shared by every node (see the README's "
           "\"Run on a cluster\")")
    return (f"{directory}: the report folder cannot be reached from node {node} ({why}); on a "
            f"cluster of several nodes every trial writes its checkpoints and models there, "
            f"so the search does not start: {how}")


def check_storage(directory, local: bool, log=print) -> None:
    """Before any trial: every alive node reads the marker the driver writes here (nothing
    to check on a local instance, one machine)."""
    token = f"{socket.gethostname()}:{uuid.uuid4().hex}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text(token)  # each trial looks for it too (check_marker)
    if local:
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        if not isinstance(directory, RemotePath) and not on_network_fs(Path(directory)):
            log(f"warning: {directory} is on this machine's own disk and the cluster has only "
                "this node now; nodes the autoscaler adds will not see it, and the first "
                "trial on one stops the search (use --reports s3://BUCKET/PREFIX or a shared "
                "NFS/EFS folder)")
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reader = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    pending = {reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(str(directory)): n for n in nodes}
    try:
        found = dict(zip(pending, ray.get(list(pending), timeout=TIMEOUT_S), strict=True))
    except ray.exceptions.GetTimeoutError:
        raise StorageUnreachable(f"{directory}: could not check the report folder from every "
                                 f"node within {TIMEOUT_S} s") from None
    for ref, seen in found.items():
        node = pending[ref]
        where = f"{node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"
        if seen != token:
            why = ("its marker is not there: the folder is not shared" if seen is None
                   else seen if seen.startswith("error:") else "another search's marker")
            raise StorageUnreachable(message(directory, where, why))
    log(f"storage: {len(nodes)} nodes reach {directory}")


def _read_marker(directory: str) -> str | None:
    """On one node: the marker's text, None when absent, "error: ..." when unreadable."""
    try:
        path = location(directory) / MARKER
        return path.read_text() if path.is_file() else None
    except Exception as e:  # credentials, network: the reason goes into the message
        return f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def check_marker(report_dir: str, trial_id: str) -> None:
    """In a trial, before it trains: the report folder is reachable from this node."""
    directory = location(report_dir)
    seen = _read_marker(report_dir)
    if seen is None or seen.startswith("error:"):
        why = "its marker is not there: the folder is not shared" if seen is None else seen
        raise StorageUnreachable(message(directory, f"{socket.gethostname()} (trial "
                                                    f"{trial_id})", why))

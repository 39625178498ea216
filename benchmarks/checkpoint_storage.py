"""A trial's checkpoint to and from S3: bytes, seconds and rate, against a copy on local disk.

A one-worker trial hands its checkpoint folder (`last.pt`: policy, optimizer, loss state, data
position, RNG, metrics so far) to Tune at every evaluation, and Tune copies it to the search's
storage with pyarrow's `copy_files`; a retried trial on another node downloads it. This script
times exactly that copy, both ways, on a local S3-compatible server (moto on 127.0.0.1, the
tests' server), beside the same copy between two folders of the local disk.

The checkpoints are real: raypo's own training path (`prepare`, `train` with a checkpoint
folder) on the built-in task's tiny model, two steps, once with full fine-tuning and once with
LoRA (r 8 on every linear layer), whose checkpoint holds the adapter, its optimizer state and
the loss's state, not the frozen base weights.

    python benchmarks/checkpoint_storage.py [--repeats 5]

Needs the test extra (`pip install -e '.[test]'`: moto). Nothing leaves the machine. Each
figure is the median over the repeats, with the range.
"""

# ruff: noqa: E402  (the environment is set before Hugging Face libraries read it at import)

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(folder: Path, lora: bool) -> Path:
    """Two training steps of the tiny built-in task, checkpointed into `folder`."""
    from raypo.train.config import load_config
    from raypo.train.loop import train
    from raypo.train.setup import prepare

    overrides = ["steps=2", "eval_every=2", "eval_samples=4", "task.train_pairs=32",
                 "task.eval_pairs=8", "task.base_steps=20", "batch_size=8", "htsr=off"]
    if lora:
        overrides.append("lora={r: 8, alpha: 16, target_modules: all-linear}")
    setup = prepare(load_config(None, overrides), log=lambda message: None)
    train(setup, checkpoint_dir=folder)
    return folder


def timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def describe(seconds: list[float], size: int) -> str:
    median = statistics.median(seconds)
    return (f"{median * 1e3:7.1f} ms [{min(seconds) * 1e3:.1f} to {max(seconds) * 1e3:.1f}], "
            f"{size / median / 1e6:7.1f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import logging

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="raypo-bench")
    s3 = pafs.S3FileSystem(endpoint_override=endpoint, access_key="bench", secret_key="bench",
                           region="us-east-1", scheme="http")
    local = pafs.LocalFileSystem()
    try:
        with tempfile.TemporaryDirectory(prefix="raypo-ckpt-") as tmp:
            root = Path(tmp)
            print(f"local S3 (moto) at {endpoint}; {args.repeats} repeats, medians [range]")
            for name, lora in (("full fine-tuning", False), ("LoRA r 8", True)):
                folder = make_checkpoint(root / name.replace(" ", "-"), lora)
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                key = f"raypo-bench/{folder.name}/checkpoint_000000"
                back, copy = root / f"{folder.name}-back", root / f"{folder.name}-copy"

                def upload(folder=folder, key=key):
                    pafs.copy_files(str(folder), key, source_filesystem=local,
                                    destination_filesystem=s3)

                def download(key=key, back=back):
                    shutil.rmtree(back, ignore_errors=True)
                    back.mkdir()  # a local destination is not made by copy_files
                    pafs.copy_files(key, str(back), source_filesystem=s3,
                                    destination_filesystem=local)

                def disk(folder=folder, copy=copy):
                    shutil.rmtree(copy, ignore_errors=True)
                    copy.mkdir()
                    pafs.copy_files(str(folder), str(copy), source_filesystem=local,
                                    destination_filesystem=local)

                up, down, near = (timed(f, args.repeats) for f in (upload, download, disk))
                assert (back / "last.pt").read_bytes() == (folder / "last.pt").read_bytes()
                print(f"\n{name}: one checkpoint, {size / 1e6:.2f} MB "
                      f"({sum(1 for p in folder.rglob('*') if p.is_file())} file)")
                print(f"  upload to S3      {describe(up, size)}")
                print(f"  download from S3  {describe(down, size)}")
                print(f"  local disk copy   {describe(near, size)}")
                base = statistics.median(near)
                print(f"  S3 / local disk: upload {statistics.median(up) / base:.1f}x, "
                      f"download {statistics.median(down) / base:.1f}x the time")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

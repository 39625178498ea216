"""Session-wide settings: a private cache folder (tokenized data, reference outputs, the built-in
base model are computed once per test session and shared), no telemetry, and one local Ray
instance for the tests that need it (start-up takes seconds, so once per session)."""

from __future__ import annotations

import os

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


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@pytest.fixture(scope="session")
def ray_session(raypo_cache):
    ray = pytest.importorskip("ray")
    old = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)  # read by ray.init and the processes it starts
    # address="local": never join a stray cluster or RAY_ADDRESS. The dashboard stays on: its
    # state API frees the placement groups of stopped Train runs.
    # TRAIN_DRIVER: what a search's multi-worker trial holds while it drives a TorchTrainer
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20,
             resources={"TRAIN_DRIVER": 2},
             runtime_env={"env_vars": {"RAYPO_CACHE": str(raypo_cache)}})
    yield ray
    ray.shutdown()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

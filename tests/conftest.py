"""Session-wide settings: a private cache folder (tokenized data, reference outputs, the built-in
base model are computed once per test session and shared), no telemetry, seeded torch."""

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

"""The project's lint configuration (pyproject.toml's [tool.ruff]) holds in CI: ruff finds
nothing in the package, the tests or the benchmarks, McCabe complexity over 12 included, and
no module of the package is over 450 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450


@pytest.mark.timeout(120)
def test_ruff_finds_nothing_complexity_included():
    config = (ROOT / "pyproject.toml").read_text()
    assert '"C901"' in config and "max-complexity = 12" in config
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "raypo", "tests",
                           "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.timeout(30)
def test_no_module_of_the_package_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "raypo").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}

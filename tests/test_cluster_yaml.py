"""cluster.yaml is a config `ray up` accepts: prepared and validated the way `ray up` does it
(provider defaults merged, then ray-schema.json), with no cloud call; and it says what raypo
needs: TRAIN_DRIVER on the head, GPU workers, the project mounted and installed."""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from packaging.requirements import Requirement  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def requirement(name: str) -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture
def prepared(raw, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"prepare_config tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return prepare_config(raw)


def test_prepared_config_passes_rays_schema_without_cloud_calls(prepared):
    validate_config(prepared)  # raises on any schema violation
    assert prepared["provider"]["type"] == "aws"


def test_schema_check_is_real(raw):
    with pytest.raises(Exception, match="head_nodes"):
        validate_config(prepare_config({**raw, "head_nodes": {}}))


def test_head_declares_train_driver_for_autoscaler_and_ray_start(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"]["TRAIN_DRIVER"] >= 1
    assert "GPU" not in head["resources"]
    start = " ".join(prepared["head_start_ray_commands"])
    match = re.search(r"--resources='(\{.*?\})'", start)
    assert match and yaml.safe_load(match.group(1)) == {"TRAIN_DRIVER":
                                                        head["resources"]["TRAIN_DRIVER"]}
    assert "--head" in start and "--dashboard-port=8265" in start


def test_a_worker_type_has_gpus_and_scales_from_zero(prepared):
    workers = {name: t for name, t in prepared["available_node_types"].items()
               if name != prepared["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, workers
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert prepared["idle_timeout_minutes"] > 0


def test_every_file_mount_source_exists_in_the_repo(prepared):
    mounts = prepared["file_mounts"]
    assert "~/raypo" in mounts
    for target, source in mounts.items():
        assert (ROOT / source).exists(), f"{target}: {source} is not in the repository"
    assert (ROOT / mounts["~/raypo"] / "search_spaces").is_dir()
    assert (ROOT / mounts["~/raypo"] / "pyproject.toml").is_file()


def test_setup_installs_raypo_with_the_projects_torch_pin(prepared):
    torch = requirement("torch")
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[key]
        pins = [Requirement(m) for c in commands for m in re.findall(r"'(torch[^']*)'", c)]
        assert pins and all(p.specifier == torch.specifier for p in pins), (key, pins)
        install = [i for i, c in enumerate(commands) if "pip install -e ~/raypo" in c]
        torch_at = [i for i, c in enumerate(commands) if "'torch" in c]
        assert install and torch_at[0] < install[0], key  # torch first, then raypo


def test_docker_images_carry_a_ray_the_project_accepts(prepared):
    ray = requirement("ray")
    for key in ("head_image", "worker_image"):
        image = prepared["docker"][key]
        version = re.match(r"rayproject/ray:([\d.]+)-py311-", image)
        assert version and ray.specifier.contains(version.group(1)), image


def test_reports_go_to_one_bucket_that_every_node_type_can_write(raw, prepared):
    # the bucket is named once (RAYPO_REPORTS, what `raypo search` writes to without --reports)
    text = (ROOT / "cluster.yaml").read_text()
    buckets = set(re.findall(r"s3://([\w.-]+)/", text))
    assert buckets == {"YOUR-BUCKET"}, buckets
    exports = [c for c in prepared["setup_commands"] if "RAYPO_REPORTS=s3://" in c]
    assert len(exports) == 1
    # Ray's own instance profile goes to the head only: each worker type names one
    workers = {name: t for name, t in prepared["available_node_types"].items()
               if name != prepared["head_node_type"]}
    for name, node in workers.items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # boto3 (the s3 extra) on every node: the report's lease is a conditional write
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("~/raypo[s3]" in c for c in prepared[key]), key

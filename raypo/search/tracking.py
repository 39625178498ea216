"""Watching a search: each trial's config, evaluations and final row also sent to MLflow,
Weights & Biases or TensorBoard, through Ray Tune's own logger callbacks, on the driver.

    tracking: [mlflow, tensorboard]                       # in the space, or
    raypo search SPACE.yaml --track mlflow --track wandb  # added to the space's

The space's `tracking:` section (raypo.search.space.Tracking) says which, and their settings;
everything is under the search's name: the MLflow experiment, the W&B project and group. Where
nothing else is said, what a local report's trackers write goes to its `tracking/` folder:
`tracking/mlflow.db` (an MLflow SQLite store), `tracking/wandb/` and `tracking/tensorboard/`.

A resumed search adds to its runs rather than duplicating them: each trial's MLflow run is
found again by its `raypo.trial_id` tag (Ray's callback would start a second run for a
restored trial), and each W&B run has the id `<search>-<trial_id>`, resumed (`resume="allow"`).
The callbacks of a resumed search are this driver's (raypo.search.tuning.restore_tuner puts
them in place of the ones Tune saved), so `--track` works on a resume too.

A tracker whose package is missing is an error naming its key (`tracking.mlflow: needs the
mlflow package: pip install 'raypo[mlflow]'`) before any work starts (`check_packages`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from raypo.search.settings import TRACKERS, Tracking
from raypo.search.space import SearchSpace, SpaceError
from raypo.storage import RemotePath

# tracker -> (the module it imports, the package to install, raypo's extra)
PACKAGES = {"mlflow": ("mlflow", "mlflow", "mlflow"), "wandb": ("wandb", "wandb", "wandb"),
            "tensorboard": ("tensorboardX", "tensorboardX", "tensorboard")}
FOLDER = "tracking"  # under a local report: what the trackers write there by default


def parse_track(values: list[str] | None) -> list[str]:
    """`--track mlflow --track wandb` or `--track mlflow,wandb`: the trackers named, checked."""
    names = []
    for value in values or []:
        for name in (v.strip() for v in value.split(",")):
            if name not in TRACKERS:
                raise SpaceError(f"--track: unknown tracker {name!r}; expected one of "
                                 f"{', '.join(TRACKERS)}")
            if name not in names:
                names.append(name)
    return names


def with_tracking(space: SearchSpace, names: list[str]) -> SearchSpace:
    """The space with the trackers `names` added to its `tracking:` (`--track`)."""
    if names:
        space.settings.tracking = space.settings.tracking.adding(names)
    return space


def check_packages(tracking: Tracking) -> None:
    """Every tracker turned on can be imported, or SpaceError naming its key and the extra
    to install (before any work: a search must not find out after its trials)."""
    for name in tracking.names:
        module, package, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise SpaceError(f"tracking.{name}: needs the {package} package: pip install "
                             f"'raypo[{extra}]'") from None


def callbacks(space: SearchSpace, directory) -> list:
    """The Tune callbacks of the space's trackers (none when it has none), for a search whose
    report is `directory` (a Path, or a RemotePath on object storage)."""
    tracking = space.settings.tracking
    check_packages(tracking)
    if not tracking.names:
        return []
    from raypo.search.trackers import TensorBoardCallback

    local = None if isinstance(directory, RemotePath) else Path(directory) / FOLDER
    made = []
    if tracking.mlflow is not None:
        made.append(_mlflow(space.name, tracking, local, directory))
    if tracking.wandb is not None:
        made.append(_wandb(space.name, tracking, local))
    if tracking.tensorboard is not None:
        logdir = tracking.tensorboard.logdir or (str(local / "tensorboard") if local else None)
        made.append(TensorBoardCallback(logdir))
    return made


def is_tracker(callback) -> bool:
    """A callback made here (what a resumed search replaces with this driver's)."""
    return getattr(callback, "raypo_tracker", False)


def _mlflow(search: str, tracking: Tracking, local: Path | None, directory):
    from raypo.search.trackers import MLflowCallback

    settings = tracking.mlflow
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if uri is None:
        if local is None:
            raise SpaceError(f"tracking.mlflow: the report is on object storage ({directory}); "
                             "give tracking.mlflow.tracking_uri (an MLflow server) or set "
                             "MLFLOW_TRACKING_URI")
        local.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(local / 'mlflow.db').resolve().as_posix()}"
        artifacts = (local / "mlflow-artifacts").resolve().as_uri()
    return MLflowCallback(search, uri, settings.experiment or search, dict(settings.tags),
                          artifacts)


def _wandb(search: str, tracking: Tracking, local: Path | None):
    from raypo.search.trackers import WandbCallback

    settings = tracking.wandb
    # the logging actors do not see this process's environment: what it says goes with them
    mode = settings.mode or os.environ.get("WANDB_MODE")
    folder = settings.dir or os.environ.get("WANDB_DIR") or (str(local) if local else None)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in {"entity": settings.entity, "mode": mode,
                               "dir": str(Path(folder).resolve()) if folder else None}.items()
             if v is not None}
    return WandbCallback(search, project=settings.project or search,
                         group=settings.group or search, **extra)

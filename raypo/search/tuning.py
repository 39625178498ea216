"""Every Ray Tune run raypo starts (a search's trials, a confirmation's runs) is built here:
Ray start-up and the environment its processes get, the resources of one trial, where Tune
keeps its state and checkpoints, and how often a trial whose process died is retried.

    start_ray(space, address, reports_root)
    tuner = build_tuner(trainable, space, storage=folder / "tune", callbacks=[recorder], ...)

Storage: a report folder on local disk (or an NFS mount) is written through raypo's atomic
local file system (whole files or none: a full disk leaves the last good state); one on object
storage goes through pyarrow's file system for its bucket, from whichever node a trial runs
on. Retries: a trial whose process or node died is retried from its last checkpoint, at most
`MAX_RETRIES` times in all, preemptions of spot nodes included (Ray does not count those unless
told to), so that a flapping node cannot loop a search for ever.
"""

from __future__ import annotations

import os

from raypo.data.cache import CACHE_STORAGE_ENV, cache_root
from raypo.search.space import SearchSpace
from raypo.search.storage import atomic_filesystem
from raypo.storage import RemotePath, tune_storage

MAX_RETRIES = 3
# what every Ray process of a search gets: no telemetry, absolute paths (no chdir into trial
# folders), and preemptions counted as failures so that MAX_RETRIES bounds them too
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0",
           "RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE": "1"}
LOCAL_STORAGE = atomic_filesystem()  # Tune's state: a full disk leaves the last whole one


def cache_storage(reports_root) -> str | None:
    """Where the shared caches of searches under `reports_root` are mirrored for every node
    (`<reports root>/.raypo-cache`): only on object storage; a local root is one machine's
    disk or an NFS mount, which every node reads as it is."""
    return str(reports_root / ".raypo-cache") if isinstance(reports_root, RemotePath) else None


def ray_env(reports_root) -> dict[str, str]:
    """The environment of every Ray process of the search: RAY_ENV, the local cache folder and
    the caches' mirror on the storage."""
    env = {"RAYPO_CACHE": str(cache_root().resolve()),
           **{k: os.environ.get(k, v) for k, v in RAY_ENV.items()}}
    mirror = cache_storage(reports_root)
    if mirror:
        env[CACHE_STORAGE_ENV] = mirror
    return env


def use_cache_storage(reports_root) -> None:
    """This process's cache reads and writes go through the mirror of `reports_root` (when it
    has one): the driver computes the shared caches before any trial."""
    mirror = cache_storage(reports_root)
    if mirror:
        os.environ[CACHE_STORAGE_ENV] = mirror
    else:  # a local report: this machine's cache (or an NFS one) is the only one
        os.environ.pop(CACHE_STORAGE_ENV, None)


def start_ray(space: SearchSpace, address: str | None, reports_root=None) -> None:
    """Join the cluster at `address`, or start a local instance on loopback."""
    import ray

    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    # Tune's result.json per trial: how a resumed search finds trials that ended unseen
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    # each trial checkpoints at every evaluation, so Tune snapshots its state often and warns
    # at every one; the snapshot is small (0.05 s locally), and a slow one still warns
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    use_cache_storage(reports_root)
    env = ray_env(reports_root)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # loopback only: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set by the CLI before Ray
        # is imported) every Ray server of a local instance listens on 127.0.0.1
        ray.init(address="local", runtime_env=runtime_env, log_to_driver=False,
                 _node_ip_address="127.0.0.1",
                 resources={"TRAIN_DRIVER": space.settings.budget.concurrency})


def trial_resources(space: SearchSpace):
    """What one trial holds: its CPUs and GPUs, or for a multi-worker trial one unit of the
    TRAIN_DRIVER resource (its Ray Train workers hold the CPUs/GPUs)."""
    from ray import tune

    r = space.settings.resources
    if r.workers > 1:
        # the trial only drives a TorchTrainer whose workers hold the CPUs/GPUs; a custom
        # resource caps how many drivers run at once (a CPU count of 0 is refused)
        return tune.PlacementGroupFactory([{"TRAIN_DRIVER": 1}])
    return {"cpu": r.cpus, "gpu": r.gpus}


def storage_of(folder) -> tuple[str, object]:
    """(storage_path, storage_filesystem) of a Tune run whose experiments live under
    `folder`."""
    return tune_storage(folder, LOCAL_STORAGE)


def can_restore(experiment) -> bool:
    from ray import tune

    path, fs = storage_of(experiment)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def restore_tuner(experiment, trainable, space: SearchSpace, trackers: list = ()):
    """The interrupted Tune run at `experiment` (its folder), its errored and unfinished
    trials to run again. Its callbacks are the ones Tune saved (the recorder) with the
    `trackers` of this driver (raypo.search.tracking) in place of any saved ones: what this
    resume was asked to track."""
    from ray import tune

    from raypo.search.tracking import is_tracker

    path, fs = storage_of(experiment)
    tuner = tune.Tuner.restore(path, trainable=tune.with_resources(trainable,
                                                                   trial_resources(space)),
                               resume_errored=True, storage_filesystem=fs)
    # Tune restores the RunConfig it pickled and takes no new one; its Tuner holds it here
    run_config = tuner._local_tuner.get_run_config()
    run_config.callbacks = [*(c for c in run_config.callbacks or [] if not is_tracker(c)),
                            *trackers]
    return tuner


def build_tuner(trainable, space: SearchSpace, *, folder, name: str, callbacks: list,
                tune_config=None, param_space=None):
    """A Tuner of `trainable` (given its resources here) whose experiment `name` lives under
    `folder` (a report's subfolder, local or on object storage)."""
    from ray import tune

    path, fs = storage_of(folder)
    return tune.Tuner(
        tune.with_resources(trainable, trial_resources(space)),
        param_space=param_space,
        tune_config=tune_config or tune.TuneConfig(),
        run_config=tune.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs, verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
            # a retried trial resumes from its latest checkpoint only
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))

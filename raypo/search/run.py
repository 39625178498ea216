"""A search: shared caches and selection evidence first, then Ray Tune + OptunaSearch.

Order of events (`run_search`):
1. the report folder: a new one, or (`resume`) the one an interrupted search left;
2. what every trial shares, computed once and read by the trials from the cache
   (RAYPO_CACHE): the built-in task's base model, tokenized data, reference outputs (one per
   distinct set of fields the space's losses need), and the selection metrics with their
   ranking of the kernel-divergence pairs (selection.parquet). On the driver, before Ray
   starts, for CPU trials; as a Ray task with a trial's resources for GPU trials (a real model
   on a CPU head would take hours), which on a multi-node cluster needs RAYPO_CACHE on shared
   storage for the trials to find it (otherwise each node computes its own on first use);
3. Ray: a local instance, or the cluster at `address`;
4. Tune: the space as an Optuna define-by-run space (TPE or NSGA-II, seeded), the predicted
   best pairs enqueued first, the scheduler on a monotonic `step`, failed workers retried;
   the recorder writes each trial's row as it ends;
5. search.json, and the rows of trials the recorder could not see (ended before a restart).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

from raypo.data.cache import cache_root
from raypo.reports.writer import write_json_atomic, write_parquet_atomic
from raypo.search.recorder import ReportRecorder
from raypo.search.space import SearchSpace, SpaceError
from raypo.search.trial import search_trial
from raypo.train.config import TrainConfig

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0"}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_key(cfg: TrainConfig) -> str:
    """What decides the shared caches of a config: the model, the data, their limits and the
    fields the loss needs (not its weights, the learning rate or the number of steps)."""
    from raypo.train.setup import loss_needs

    declared = loss_needs(cfg)  # what the loss reads decides which reference outputs are cached
    return json.dumps({
        "model": cfg.model, "data": cfg.data, "task": cfg.task.model_dump() if cfg.builtin
        else None, "data_seed": cfg.data_seed, "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length, "truncate": cfg.truncate_responses,
        "eval_fraction": cfg.eval_fraction, "dtype": cfg.dtype, "topk": cfg.topk,
        "reads": sorted(declared.fields), "live": declared.full_reference_logits,
        "fitted": declared.fitted_embeddings, "embedding_source": cfg.embedding_source,
        "lora": cfg.lora, "sft_steps": cfg.sft_steps}, sort_keys=True, default=str)


def warm_caches(space: SearchSpace, log=_log) -> int:
    """Compute every cache the trials will read, once, here; returns how many set-ups ran."""
    from raypo.train.setup import prepare

    configs = {}
    for values in space.representative_values():
        cfg = space.config(values)
        configs.setdefault(cache_key(cfg), cfg)
    for i, cfg in enumerate(configs.values(), 1):
        log(f"shared caches {i}/{len(configs)}: {cfg.loss.name} on "
            f"{cfg.data or 'builtin:' + cfg.task.variant}")
        prepare(cfg, log=log)
    return len(configs)


def _ranked_losses(space: SearchSpace) -> set[str]:
    """The losses of the space whose (kernel, divergence) pair the selection rule ranks."""
    from raypo.losses import LOSSES

    names = {space.config(v).loss.name for v in space.representative_values()}
    return {n for n in names if LOSSES.get_class(n).selection_params}


def selection_evidence(space: SearchSpace, directory: Path, log=_log):
    """selection.parquet: the metrics and the predicted rank of each kernel-divergence pair;
    returns {(kernel, divergence): rank}."""
    import pandas as pd

    path = directory / "selection.parquet"
    if path.is_file():
        table = pd.read_parquet(path)
    else:
        from raypo.search.evidence import selection_table

        cfg = space.config(space.representative_values()[0])
        log("selection metrics: computing on the reference model (no training)")
        table = selection_table(cfg, max_pairs=space.settings.selection.max_pairs, log=log)
        table.insert(0, "search", space.name)
        write_parquet_atomic(path, table)
    return {(r.kernel, r.divergence): int(r.predicted_rank) for r in table.itertuples()}


def warm_start_points(space: SearchSpace, ranks: dict) -> list[dict]:
    """The predicted best kernel-divergence pairs, as Optuna trials to run first (only the
    pairs the space can produce, for the first loss of the space whose pair is ranked)."""
    from raypo.losses import LOSSES

    n = space.settings.selection.warm_start
    ranked = [x for x in space.loss_names if x in LOSSES and LOSSES.get_class(x).selection_params]
    if not n or not ranked:
        return []
    loss = ranked[0]
    kernel, divergence = (space.param_at(("loss", p), loss)
                          for p in LOSSES.get_class(loss).selection_params)
    if kernel is None or divergence is None:
        return []
    name = space.param_at(("loss", "name"))
    points = []
    for (k, d), _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if k in kernel.choices and d in divergence.choices:
            point = {kernel.name: k, divergence.name: d}
            if name is not None:
                point[name.name] = loss
            points.append(point)
        if len(points) == n:
            break
    return points


def _sampler(space: SearchSpace):
    import optuna

    s = space.settings.sampler
    two = len(space.objectives) == 2
    name = s.name or ("nsga2" if two else "tpe")
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=s.seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():  # multivariate/group are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: conditional parameters (a kernel's sigma) are modelled within the trials
        # that have them, rather than as independent
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials,
                                          multivariate=True, group=True,
                                          constant_liar=True)


def _scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    sch = space.settings.scheduler
    mode = space.objectives[0].mode
    steps = [space.config(v) for v in space.representative_values()]
    max_t = max(c.steps for c in steps)
    grace = sch.grace_period * min(c.eval_every for c in steps)
    if sch.name == "asha":
        return ASHAScheduler(time_attr="step", metric="objective", mode=mode, max_t=max_t,
                             grace_period=min(grace, max_t),
                             reduction_factor=sch.reduction_factor)
    if sch.name == "median":
        return MedianStoppingRule(time_attr="step", metric="objective", mode=mode,
                                  grace_period=grace, min_samples_required=3)
    return FIFOScheduler()


def _resources(space: SearchSpace):
    from ray import tune

    r = space.settings.resources
    if r.workers > 1:
        # the trial only drives a TorchTrainer whose workers hold the CPUs/GPUs; a custom
        # resource caps how many drivers run at once (a CPU count of 0 is refused)
        return tune.PlacementGroupFactory([{"TRAIN_DRIVER": 1}])
    return {"cpu": r.cpus, "gpu": r.gpus}


def _start_ray(space: SearchSpace, address: str | None) -> None:
    import ray

    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    # Tune's result.json per trial: how a resumed search finds trials that ended unseen
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"RAYPO_CACHE": str(cache_root().resolve()),
                                **{k: os.environ[k] for k in RAY_ENV}}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address="local", runtime_env=runtime_env, log_to_driver=False,
                 resources={"TRAIN_DRIVER": space.settings.budget.concurrency})


def _meta(space: SearchSpace, status: str, started: float, extra: dict) -> dict:
    import optuna
    import ray
    import torch
    import transformers

    import raypo

    return {"kind": "search", "name": space.name, "status": status, "source": space.source,
            "space": space.raw, "params": [p.name for p in space.params],
            "objectives": [o.model_dump() for o in space.objectives],
            "settings": space.settings.model_dump(mode="json"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": time.time() - started,
            "versions": {"raypo": raypo.__version__, "ray": ray.__version__,
                         "optuna": optuna.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "python": platform.python_version()},
            **extra}


def shared_work(space: SearchSpace, directory: Path, log=_log) -> dict:
    """Caches, then selection evidence; returns the predicted ranks of the pairs."""
    warm_caches(space, log=log)
    if space.settings.selection.enabled and _ranked_losses(space):
        return selection_evidence(space, directory, log=log)
    return {}


def _remote_shared_work(space: SearchSpace, directory: Path, log) -> dict:
    """`shared_work` on a node with a trial's GPUs (a Ray task); its errors re-raised here."""
    import ray

    r = space.settings.resources
    task = ray.remote(num_cpus=r.cpus, num_gpus=r.gpus)(shared_work)
    log(f"shared caches: on a node with {r.gpus:g} GPU(s)")
    try:
        return ray.get(task.remote(space, directory, _log))
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


def run_search(space: SearchSpace, *, reports: str | Path = "reports", address: str | None
               = None, resume: bool = False, confirm: bool | None = None, log=_log) -> Path:
    """Run (or resume) the search, then its confirmation stage when the space has one (or
    `confirm` is True; False skips it); returns the report folder."""
    from ray import tune

    directory = (Path(reports) / space.name).resolve()
    tune_dir = directory / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise SpaceError(f"{directory}: no interrupted search to resume there")
    if not resume and (directory / "trials.parquet").exists():
        raise SpaceError(f"{directory}: a search of this name has results; pass --resume to "
                         "continue it or --name to start another")
    started = time.time()
    log(f"search {space.name}: {space.settings.budget.trials} trials, "
        f"{len(space.params)} searched parameters, report in {directory}")
    gpus = space.settings.resources.gpus
    if gpus:
        _start_ray(space, address)
        ranks = _remote_shared_work(space, directory, log)
    else:  # before Ray: bad data or model paths fail here, in seconds, with nothing written
        ranks = shared_work(space, directory, log)
        _start_ray(space, address)
    import ray

    resources = ray.cluster_resources()
    if space.settings.resources.workers > 1 and "TRAIN_DRIVER" not in resources:
        raise SpaceError(f"{space.source}: resources.workers > 1 needs a TRAIN_DRIVER "
                         "resource on the cluster (see cluster.yaml)")
    extra = {"address": address or "local", "cluster_resources": resources,
             "cache": str(cache_root().resolve())}
    write_json_atomic(directory / "search.json", _meta(space, "running", started, extra))
    recorder = ReportRecorder(str(directory), space.name, space, ranks,
                              total=space.settings.budget.trials)
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, space=space, report_dir=str(directory)),
        _resources(space))
    if resume:
        log(f"resuming {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = _tuner(space, trainable, recorder, directory, ranks)
    results = tuner.fit()
    _reconcile(results, recorder)
    # Ctrl-C (Tune saves its state and returns) or the time limit: say so, and how to go on
    done = len(recorder.writer.trials)
    status = "finished" if done >= planned_trials(space) else "incomplete"
    if status == "incomplete":
        log(f"{done} of {planned_trials(space)} trials ended; continue with --resume")
    write_json_atomic(directory / "search.json", _meta(space, status, started, extra))
    settings = space.settings.confirm
    if confirm is None:
        confirm = settings is not None
    if confirm and status == "finished":
        from raypo.search.confirm import run_confirmation
        from raypo.search.space import Confirm

        run_confirmation(space, directory, settings or Confirm(), address=address, log=log)
    elif confirm:
        log(f"confirmation not started: the search is incomplete; after --resume, or on what "
            f"finished: raypo confirm {directory}")
    return directory


def planned_trials(space: SearchSpace) -> int:
    """budget.trials, or fewer when a grid has fewer distinct trials."""
    trials = space.settings.budget.trials
    if space.settings.sampler.name == "grid":
        trials = min(trials, int(space.grid_size()))
    return trials


def _tuner(space: SearchSpace, trainable, recorder, directory: Path, ranks: dict):
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    objectives = space.objectives
    metric = [o.metric for o in objectives] if len(objectives) == 2 else "objective"
    mode = [o.mode for o in objectives] if len(objectives) == 2 else objectives[0].mode
    points = warm_start_points(space, ranks)
    searcher = OptunaSearch(space=space.define, metric=metric, mode=mode,
                            sampler=_sampler(space), seed=space.settings.sampler.seed,
                            points_to_evaluate=points or None)
    budget = space.settings.budget
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(space),
                                    num_samples=planned_trials(space),
                                    max_concurrent_trials=budget.concurrency,
                                    time_budget_s=budget.time_limit_s, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(directory), verbose=0,
                                  callbacks=[recorder],
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  # a retried trial resumes from its latest checkpoint only
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _reconcile(results, recorder: ReportRecorder) -> None:
    """Rows for trials that ended while no recorder watched (before a resume)."""
    known = set(recorder.writer.trials.get("trial_id", []))
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id and trial_id not in known:
            error = str(result.error) if result.error else None
            tag = re.search(rf"{trial_id}_(\d+)", Path(result.path).name if result.path else "")
            recorder.record(trial_id, result.config or {}, result.metrics or {}, error=error,
                            number=int(tag.group(1)) if tag else -1)


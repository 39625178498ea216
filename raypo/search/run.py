"""A search: shared caches and selection evidence first, then Ray Tune + OptunaSearch.

Order of events (`run_search`):
1. the report folder (`<reports>/<name>`, on local disk, an NFS mount or object storage,
   raypo.storage): a new one, or (`resume`) the one an interrupted search left;
2. what every trial shares, computed once and read by the trials from the cache
   (RAYPO_CACHE): the built-in task's base model, tokenized data, reference outputs (one per
   distinct set of fields the space's losses need), and the selection metrics with their
   ranking of the kernel-divergence pairs (selection.parquet). On the driver, before Ray
   starts, for CPU trials; as a Ray task with a trial's resources for GPU trials (a real model
   on a CPU head would take hours). With the report on object storage the caches are mirrored
   there (raypo.data.cache), so a trial on any node downloads them instead of computing them;
3. Ray: a local instance, or the cluster at `address`, whose every node must see the report
   folder (raypo.search.reach) before any trial starts;
4. Tune (raypo.search.tuning): the space as an Optuna define-by-run space (TPE or NSGA-II,
   seeded), the predicted best pairs enqueued first, the scheduler on a monotonic `step`,
   failed workers retried from their checkpoints; the recorder writes each trial's row as it
   ends, and the space's trackers (raypo.search.tracking: MLflow, W&B, TensorBoard) get each
   trial's config and reports;
5. search.json, and the rows of trials the recorder could not see (ended before a restart).

The confirmation stage that may follow is chained by raypo.search.pipeline.
"""

from __future__ import annotations

import json
import platform
import re
import signal
import sys
import time
import warnings
from pathlib import Path

from raypo.data.cache import cache_root, publish_used
from raypo.reports.writer import (
    ReportWriteError,
    read_table,
    write_json_atomic,
    write_parquet_atomic,
)
from raypo.search import tracking, tuning
from raypo.search.checks import (
    check_live_memory,
    check_memory,
    check_objectives,
    check_resources,
)
from raypo.search.interrupt import Interrupted, Interrupts, resume_command
from raypo.search.keep import forget_missing
from raypo.search.reach import StorageUnreachable, check_storage
from raypo.search.recorder import ReportRecorder
from raypo.search.space import SearchSpace, SpaceError
from raypo.search.trial import search_trial
from raypo.storage import location
from raypo.train.config import TrainConfig
from raypo.train.plan import GB


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_key(cfg: TrainConfig) -> str:
    """What decides the shared caches of a config: the model, the data, their limits, the
    fields the loss needs and the judge (not its weights, the learning rate or the number of
    steps)."""
    from raypo.train.setup import loss_needs

    declared = loss_needs(cfg)  # what the loss reads decides which reference outputs are cached
    return json.dumps({
        "model": cfg.model, "data": cfg.data, "task": cfg.task.model_dump() if cfg.builtin
        else None, "data_seed": cfg.data_seed, "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length, "truncate": cfg.truncate_responses,
        "eval_fraction": cfg.eval_fraction, "dtype": cfg.dtype, "topk": cfg.topk,
        "reads": sorted(declared.fields), "live": declared.full_reference_logits,
        "fitted": declared.fitted_embeddings, "embedding_source": cfg.embedding_source,
        "lora": cfg.lora, "sft_steps": cfg.sft_steps,
        # the reference's judged samples are a cache too (raypo.train.judging)
        "judge": cfg.judge.model_dump() if cfg.judge is not None else None},
        sort_keys=True, default=str)


def warm_caches(space: SearchSpace, log=_log, reported: set | None = None) -> int:
    """Compute every cache the trials will read, once, here; returns how many set-ups ran.
    `reported` gains the metrics the trials will report (raypo.train.reported)."""
    from raypo.reports.schema import metric_columns
    from raypo.train.reported import reported_metrics
    from raypo.train.setup import prepare

    configs, every = {}, []
    for values in space.representative_values():
        cfg = space.config(values)
        configs.setdefault(cache_key(cfg), cfg)
        every.append(cfg)
    setups = {}
    for i, (key, cfg) in enumerate(configs.items(), 1):
        log(f"shared caches {i}/{len(configs)}: {cfg.loss.name} on "
            f"{cfg.data or 'builtin:' + cfg.task.variant}")
        setups[key] = prepare(cfg, log=log)
    if reported is not None:
        for cfg in {repr(c.loss.model_dump()): c for c in every}.values():
            reported |= metric_columns(cfg, reported_metrics(setups[cache_key(cfg)], cfg))
    return len(configs)


def _ranked_losses(space: SearchSpace) -> set[str]:
    """The losses of the space whose (kernel, divergence) pair the selection rule ranks."""
    from raypo.losses import LOSSES

    names = {space.config(v).loss.name for v in space.representative_values()}
    return {n for n in names if LOSSES.get_class(n).selection_params}


def selection_evidence(space: SearchSpace, directory, log=_log):
    """selection.parquet: the metrics and the predicted rank of each kernel-divergence pair;
    returns {(kernel, divergence): rank}."""
    path = directory / "selection.parquet"
    if path.is_file():
        table = read_table(path)
    else:
        from raypo.search.evidence import selection_table

        cfg = space.representative_config
        log("selection metrics: computing on the reference model (no training)")
        table = selection_table(cfg, max_pairs=space.settings.selection.max_pairs,
                                gamma=space_kernel_weight(space), log=log)
        table.insert(0, "search", space.name)
        write_parquet_atomic(path, table)
    return {(r.kernel, r.divergence): int(r.predicted_rank) for r in table.itertuples()}


def space_kernel_weight(space: SearchSpace) -> float | None:
    """The kernel-margin weight the space's ranked loss trains with: its fixed value, or the
    middle of its searched range (geometric for a log range), or of its choices."""
    import math
    import statistics

    from raypo.losses import LOSSES
    from raypo.search.evidence import kernel_weight

    ranked = [n for n in space.loss_names if n in LOSSES and LOSSES.get_class(n).selection_params]
    if not ranked:
        return None
    name = LOSSES.get_class(ranked[0]).kernel_weight_param
    param = space.param_at(("loss", name), ranked[0]) if name else None
    if param is None:
        values = next((v for v in space.representative_values()
                       if space.config(v).loss.name == ranked[0]), {})
        cfg = space.config(values)
        return kernel_weight(cfg.loss.name, cfg.loss.params)
    if param.kind in ("choice", "value"):
        numbers = [float(c) for c in param.choices if isinstance(c, int | float)]
        return statistics.median(numbers) if numbers else None
    if param.log:
        return math.sqrt(param.low * param.high)
    return (param.low + param.high) / 2


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


def shared_work(space: SearchSpace, directory, log=_log) -> dict:
    """Caches, then selection evidence; returns the predicted ranks of the pairs."""
    reported: set[str] = set()
    warm_caches(space, log=log, reported=reported)
    check_objectives(space, reported)  # before any trial: a misspelt metric is an error
    publish_used(log)  # what this node had from earlier searches, for every other node
    if space.settings.selection.enabled and _ranked_losses(space):
        return selection_evidence(space, directory, log=log)
    return {}


def _remote_shared_work(space: SearchSpace, directory, log) -> dict:
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
               = None, resume: bool = False, log=_log, interrupts: Interrupts | None = None):
    """Run (or resume) the search; returns the report folder (a Path, or a RemotePath on
    object storage) and whether the search finished. Raises Interrupted after SIGINT/SIGTERM
    (the unfinished trials recorded as interrupted, search.json incomplete), ReportWriteError
    when the report cannot be written (the tables as they were) and StorageUnreachable when a
    node cannot reach the report's storage."""
    if interrupts is None:
        with Interrupts() as own:
            return run_search(space, reports=reports, address=address, resume=resume,
                              log=log, interrupts=own)
    tracking.check_packages(space.settings.tracking)  # a missing tracker's package: now
    root = location(reports)
    directory = _report_folder(space, root, resume)
    experiment = directory / "tune"
    trackers = tracking.callbacks(space, directory)  # MLflow, W&B, TensorBoard
    started = time.time()
    log(f"search {space.name}: {space.settings.budget.trials} trials, "
        f"{len(space.params)} searched parameters, report in {directory}")
    ranks, resources = _before_trials(space, address, root, directory, log)
    extra = {"address": address or "local", "cluster_resources": resources,
             "cache": str(cache_root().resolve()), "storage": str(directory),
             "resume": resume_command(space, reports, address)}
    write_json_atomic(directory / "search.json", _meta(space, "running", started, extra))
    recorder = ReportRecorder(str(directory), space.name, space, ranks,
                              total=space.settings.budget.trials)
    trainable = tune_trainable(space, directory)
    if resume:
        log(f"resuming {experiment}")
        tuner = tuning.restore_tuner(experiment, trainable, space, trackers)
    else:
        tuner = _tuner(space, trainable, recorder, directory, ranks, trackers)
    with interrupts.tuning():  # Ctrl-C, SIGTERM: Tune saves its state and returns
        results = tuner.fit()
    _raise_failure(interrupts.failure, recorder, extra["resume"])
    _reconcile(results, recorder, interrupted=interrupts.signum is not None)
    forget_missing(recorder.writer)  # rows of models a killed driver removed (resume)
    # interrupted, or the time limit: say so, and how to go on
    trials = recorder.writer.trials
    done = int((trials["status"] != "interrupted").sum()) if len(trials) else 0
    status = ("finished" if done >= planned_trials(space) and interrupts.signum is None
              else "incomplete")
    if interrupts.signum is not None:
        extra["interrupted_by"] = signal.Signals(interrupts.signum).name
    write_json_atomic(directory / "search.json", _meta(space, status, started, extra))
    if interrupts.signum is not None:
        raise Interrupted(interrupts.signum, f"interrupted by {extra['interrupted_by']}: "
                          f"{done} of {planned_trials(space)} trials ended, "
                          f"{len(trials) - done} interrupted; {directory}/search.json says "
                          f"incomplete; continue with: {extra['resume']}")
    if status == "incomplete":
        log(f"{done} of {planned_trials(space)} trials ended; continue with: "
            f"{extra['resume']}")
    return directory, status == "finished"


def _report_folder(space: SearchSpace, root, resume: bool):
    """The search's folder under `root`: one an interrupted search left (`resume`), or one
    without results; SpaceError otherwise. Caches computed from here on go to its storage."""
    directory = (root / space.name).resolve()  # a RemotePath resolves to itself
    tuning.use_cache_storage(root)  # caches computed here go to the storage for every node
    if resume and not tuning.can_restore(directory / "tune"):
        raise SpaceError(f"{directory}: no interrupted search to resume there")
    if not resume and (directory / "trials.parquet").exists():
        raise SpaceError(f"{directory}: a search of this name has results; pass --resume to "
                         "continue it or --name to start another")
    return directory


def _before_trials(space: SearchSpace, address, root, directory, log) -> tuple[dict, dict]:
    """(ranks, the cluster's resources): the memory plan, the shared caches and the selection
    evidence, and Ray (a local instance or the cluster at `address`)."""
    if space.settings.resources.gpus:
        # the memory plan before any trial and any cache: against the declared GPU before
        # Ray starts, or a live one's (raypo.search.checks)
        declared = space.settings.resources.gpu_memory_gb
        if declared is not None:
            check_memory(space, declared * GB, f"resources.gpu_memory_gb: {declared:g}", log)
        _start_cluster(space, address, root, directory, log)
        if declared is None:
            check_live_memory(space, log)
        ranks = _remote_shared_work(space, directory, log)
    else:  # before Ray: bad data or model paths fail here, in seconds, with nothing written
        ranks = shared_work(space, directory, log)
        _start_cluster(space, address, root, directory, log)
    import ray

    resources = ray.cluster_resources()
    if space.settings.resources.workers > 1 and "TRAIN_DRIVER" not in resources:
        raise SpaceError(f"{space.source}: resources.workers > 1 needs a TRAIN_DRIVER "
                         "resource on the cluster (see cluster.yaml)")
    return ranks, resources


def _raise_failure(error, recorder: ReportRecorder, resume: str) -> None:
    """A full disk, a folder gone read-only, a node that cannot reach the storage: the
    recorder (Tune's copy of it, after a resume) stopped the fit like Ctrl-C; say so."""
    if isinstance(error, StorageUnreachable):
        raise error
    if error is not None:
        raise ReportWriteError(f"{error}; the search stopped; the tables on disk hold the "
                               f"{len(recorder.writer.trials)} trials recorded before; free "
                               f"space, then continue with: {resume}", error.errno)


def tune_trainable(space: SearchSpace, directory):
    """The search's trainable, given the space and the report folder (its URI on object
    storage: each trial opens the storage on its own node)."""
    from ray import tune

    return tune.with_parameters(search_trial, space=space, report_dir=str(directory))


def _start_cluster(space: SearchSpace, address: str | None, root, directory, log) -> None:
    """Ray started or joined, the trial's resources checked against it, and the report folder
    checked from every node (a trial on a node that cannot reach it would lose its model and
    checkpoints)."""
    tuning.start_ray(space, address, root)
    _check_cluster(space, address, log)
    check_storage(directory, local=address is None, log=log)


def _check_cluster(space: SearchSpace, address: str | None, log) -> None:
    import ray

    check_resources(space, ray.cluster_resources(), local=address is None, log=log)


def planned_trials(space: SearchSpace) -> int:
    """budget.trials, or fewer when a grid has fewer distinct trials."""
    trials = space.settings.budget.trials
    if space.settings.sampler.name == "grid":
        trials = min(trials, int(space.grid_size()))
    return trials


def _tuner(space: SearchSpace, trainable, recorder, directory, ranks: dict,
           trackers: list = ()):
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
    return tuning.build_tuner(
        trainable, space, folder=directory, name="tune", callbacks=[recorder, *trackers],
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(space),
                                    num_samples=planned_trials(space),
                                    max_concurrent_trials=budget.concurrency,
                                    time_budget_s=budget.time_limit_s, reuse_actors=True))


def _reconcile(results, recorder: ReportRecorder, interrupted: bool = False) -> None:
    """Rows for trials that ended while no recorder watched (before a resume), and, after an
    interrupt, for the trials it stopped (status interrupted)."""
    known = set(recorder.writer.trials.get("trial_id", []))
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id and trial_id not in known:
            error = str(result.error) if result.error else None
            tag = re.search(rf"{trial_id}_(\d+)", Path(result.path).name if result.path else "")
            recorder.record(trial_id, result.config or {}, result.metrics or {}, error=error,
                            number=int(tag.group(1)) if tag else -1,
                            status="interrupted" if interrupted else None)


"""What a search checks before its first trial, beyond the space's own validation: that its
objective metrics are ones the trials report, that the cluster can ever give a trial the
resources it asks for (otherwise a misspelt metric leaves every trial without an objective,
and an impossible request waits for ever), and that its most demanding trial's memory plan
(raypo.train.plan) fits one GPU (otherwise every trial runs out of memory at its first step,
after the cluster has started and the caches are computed)."""

from __future__ import annotations

import difflib

from raypo.search.space import SearchSpace, SpaceError

# A local instance only has what this machine has; a cluster's autoscaler may add nodes.
LOCAL_WAIT = "on this machine it would wait for ever"


def check_objectives(space: SearchSpace, reported: set[str]) -> None:
    """Every objective's metric is among `reported` (raypo.train.reported)."""
    key = "objectives" if space.settings.objectives else "objective.metric"
    for objective in space.objectives:
        if objective.metric in reported:
            continue
        near = difflib.get_close_matches(objective.metric, sorted(reported), n=3)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        raise SpaceError(f"{space.source}: {key}: no trial reports a metric "
                         f"{objective.metric!r}; {hint}the trials report: "
                         f"{', '.join(sorted(reported))}")


def check_resources(space: SearchSpace, cluster: dict, local: bool, log=print) -> None:
    """A trial's request fits the cluster's total resources (SpaceError on a local
    instance; a warning on a cluster, whose autoscaler may add the nodes)."""
    r = space.settings.resources
    if r.workers > 1:  # Ray Train's workers take one CPU (and one GPU with use_gpu) each
        asks = [("resources.workers", "CPU", r.workers, f"{r.workers} workers x 1"),
                ("resources.workers", "GPU", r.workers if r.gpus else 0,
                 f"{r.workers} workers x 1")]
    else:
        asks = [("resources.cpus", "CPU", r.cpus, f"{r.cpus:g}"),
                ("resources.gpus", "GPU", r.gpus, f"{r.gpus:g}")]
    for key, resource, need, shown in asks:
        have = float(cluster.get(resource, 0))
        if need <= have or need == 0:
            continue
        message = (f"{space.source}: {key}: a trial asks for {shown} {resource}(s) but the "
                   f"Ray cluster has {have:g} in all")
        if local:
            raise SpaceError(f"{message}; {LOCAL_WAIT}: lower {key}, or run on a cluster "
                             "(--address)")
        log(f"warning: {message}; trials wait until the autoscaler adds nodes with them")


# --- memory ---------------------------------------------------------------------------------

# The keys whose largest value makes a trial's memory largest (raypo.train.plan); every choice
# of the space (loss, dtype, checkpointing, LoRA targets) is tried at those values.
MEMORY_KEYS = (("batch_size",), ("max_length",), ("logits_chunk",), ("grad_accum",),
               ("lora", "r"))
# the searched values a plan names (the others do not change a trial's memory)
SHOWN = {"batch_size", "max_length", "logits_chunk", "grad_accum", "lora", "dtype",
         "gradient_checkpointing", "parallel", ("loss", "name")}
GPU_READ_TIMEOUT_S = 120.0  # a GPU node's memory is read by a Ray task; none runs after this


def space_plan(space: SearchSpace, device: str = "cuda"):
    """(plan, values): the memory plan of the space's most demanding trial and the searched
    values of SHOWN keys it was made at (SearchSpace.at_largest over MEMORY_KEYS).
    PlanError when the model's config cannot be read."""
    from pydantic import ValidationError

    from raypo.train.plan import estimate

    best = None
    for raised, plain in zip(space.at_largest(MEMORY_KEYS), space.representative_values(),
                             strict=True):
        try:
            values, cfg = raised, space.config(raised)
        except (ValidationError, ValueError):  # the largest values together break a rule
            values, cfg = plain, space.config(plain)
        plan = estimate(cfg, device=device)
        if best is None or plan.total > best[0].total:
            best = (plan, values)
    plan, values = best
    shown = {k: v for k, v in values.items()
             if space.param(k).path[0] in SHOWN or tuple(space.param(k).path) in SHOWN}
    return plan, shown


def trial_share(space: SearchSpace) -> float:
    """The share of one GPU's memory a trial (or each of its workers) has: a fraction of a
    GPU shares it with other trials; one process uses one GPU however many it asks for."""
    r = space.settings.resources
    return 1.0 if r.workers > 1 else min(1.0, r.gpus)


def check_memory(space: SearchSpace, gpu_bytes: float, against: str, log=print):
    """The most demanding trial's plan against one GPU's `gpu_bytes` (its trial's share);
    SpaceError (exit 2) with the plan's parts and what to change when it does not fit."""
    from raypo.train.plan import GB, PlanError, check

    available = gpu_bytes * trial_share(space)
    if trial_share(space) < 1:
        against += f", x {trial_share(space):g} (resources.gpus: a shared GPU)"
    try:
        plan, _ = space_plan(space)
        check(plan, available, against)
    except PlanError as e:
        raise SpaceError(f"{space.source}: {e}") from None
    log(f"memory plan: {plan.total / GB:.1f} GB of {available / GB:.1f} GB ({against}) for "
        "the most demanding trial")
    return plan


def live_gpu_memory(timeout_s: float = GPU_READ_TIMEOUT_S) -> float | None:
    """One GPU's memory in bytes, read on a node of the Ray cluster by a task that holds one;
    None when the cluster has no GPU now (an autoscaling cluster's start) or none answered
    within `timeout_s` (all busy)."""
    import ray

    if not ray.cluster_resources().get("GPU"):
        return None

    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    ref = ray.remote(num_gpus=1, num_cpus=0)(total_memory).remote()
    try:
        return float(ray.get(ref, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None


def check_live_memory(space: SearchSpace, log=print, timeout_s: float = GPU_READ_TIMEOUT_S):
    """A GPU search without resources.gpu_memory_gb: the plan against a live GPU's memory;
    SpaceError asking for resources.gpu_memory_gb when none can be read."""
    gpu = live_gpu_memory(timeout_s)
    if gpu is None:
        raise SpaceError(
            f"{space.source}: resources.gpu_memory_gb: needed to check the trials' memory "
            f"before they start, and no GPU of the cluster could be read (none is up yet, as at "
            f"an autoscaling cluster's start, or none was free within {timeout_s:g} s); give "
            "one GPU's memory in GB, e.g. resources: {gpu_memory_gb: 24} for an A10G")
    return check_memory(space, gpu, "the cluster's GPU", log)


def plan_report(space: SearchSpace) -> tuple[str, str | None]:
    """`raypo search --plan`: the plan of the space's most demanding trial against one GPU's
    memory (resources.gpu_memory_gb, else this machine's GPU) times a trial's share, as text,
    and why it cannot fit (None when it fits or is not checked)."""
    from raypo.train.plan import GB, local_gpu

    r = space.settings.resources
    gpu = None
    if r.gpus and r.gpu_memory_gb is not None:
        gpu = (r.gpu_memory_gb * GB, f"resources.gpu_memory_gb: {r.gpu_memory_gb:g}")
    elif r.gpus:
        gpu = local_gpu(space.representative_config)
    plan, values = space_plan(space, device="cuda" if r.gpus else "cpu")
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    title = (f"memory plan of {space.source}, its most demanding trial"
             f"{f' ({shown})' if shown else ''}:")
    if gpu is None:
        why = ("CPU trials: not checked against memory" if not r.gpus else
               "not checked: no resources.gpu_memory_gb and no GPU here; a search reads a "
               "GPU node's memory at its start, or needs resources.gpu_memory_gb")
        return f"{title}\n{plan.describe(against=why)}", None
    share = trial_share(space)
    against = gpu[1] + (f" x {share:g} (resources.gpus)" if share < 1 else "")
    text = f"{title}\n{plan.describe(gpu[0] * share, against)}"
    if plan.fits(gpu[0] * share):
        return text, None
    return text, f"the memory plan of the most demanding trial does not fit ({against})"

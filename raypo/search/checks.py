"""What a search checks before its first trial, beyond the space's own validation: that its
objective metrics are ones the trials report, and that the cluster can ever give a trial the
resources it asks for (otherwise a misspelt metric leaves every trial without an objective,
and an impossible request waits for ever)."""

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

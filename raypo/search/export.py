"""`raypo export REPORT [--trial ID] DIR`: a trained model out of a report folder.

The model of a trial the search kept (`models/<trial_id>/`, see raypo.search.keep) is copied to
DIR (default: the best trial's), written whole by a rename as every raypo save is. A trial
whose model was not kept is rebuilt only when asked (`rebuild`): its training config is
re-created exactly (a search trial's from the space in search.json and the trial's own
searched values in its row; a `raypo train` report's from its config) and trained again
with the same seed, which on a CPU gives the same weights and on a GPU the same up to
nondeterministic kernels.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from raypo.models.save import (
    ModelSave,
    check_target,
    is_saved_model,
    publish,
    read_meta,
    staging_beside,
    write_meta,
)
from raypo.reports import load
from raypo.search.space import SpaceError
from raypo.storage import is_remote, location


class ExportError(SpaceError):
    """The report has no such trial, or no model for it: the message says how to get one."""


def export_model(report: str | Path, target: str | Path, trial_id: str | None = None, *,
                 rebuild: bool = False, merge: bool = False, log=print) -> Path:
    """Copy (or with `rebuild`, re-train) the model of `trial_id` (default: the best trial)
    of the report folder `report` into `target`; returns `target`."""
    target = Path(target).expanduser().absolute()
    try:
        report = location(report)  # a local folder, or a bucket's: then downloaded
        rep = load(report)
    except (OSError, ValueError) as e:
        raise ExportError(str(e)) from None
    row = _trial(rep, trial_id)
    trial_id = str(row["trial_id"])
    check_target(target)
    kept = row.get("model_path")
    source = report / kept if isinstance(kept, str) and kept else None
    if source is not None and is_saved_model(source):
        log(f"{report}: trial {trial_id}'s kept model -> {target}")
        return _copy(source, target, merge, {"report": str(report.resolve()),
                                             "trial_id": trial_id})
    if not rebuild:
        raise ExportError(_not_kept(report, rep, row))
    return _rebuild(report, rep, row, target, merge, log)


def _trial(rep, trial_id: str | None):
    """The row of `trial_id` among the search's trials or the confirmation's runs; by
    default the confirmation's kept model (the best finalist's best seed), else the best
    trial."""
    trials, runs = rep.trials, rep.confirm
    if trial_id is None:
        trial_id = (rep.meta.get("confirmation") or {}).get("model_run")
        if trial_id is None:
            try:
                return rep.best()
            except ValueError:
                raise ExportError(f"{rep.path}: no finished trial to export") from None
    for table in (trials, runs):
        match = table[table["trial_id"] == trial_id] if len(table) else table
        if not match.empty:
            return match.iloc[0]
    known = ", ".join(map(str, trials.get("trial_id", [])))
    also = (f"; its confirmation runs: {', '.join(map(str, runs['trial_id']))}"
            if len(runs) else "")
    raise ExportError(f"{rep.path}: no trial {trial_id!r}; its trials are: {known}{also}")


def _not_kept(report: Path, rep, row) -> str:
    trial_id, status = row["trial_id"], row.get("status")
    keep = (rep.meta.get("settings") or {}).get("keep", {}).get("best", 1)
    how = (f"rebuild it (re-trains the trial's config with its seed, about "
           f"{float(row.get('wall_s') or 0):.0f} s as recorded): raypo export {report} "
           f"--trial {trial_id} DIR --rebuild; or train it yourself with raypo train CONFIG "
           "--save DIR")
    if rep.meta.get("kind") == "train":
        return (f"{report}: this `raypo train` report kept no model (train with --save DIR "
                f"to keep one); {how}")
    if status == "failed":
        return f"{report}: trial {trial_id} failed ({row.get('error')}): it has no model"
    if isinstance(row.get("role"), str):
        return (f"{report}: confirmation run {trial_id}'s model was not kept: the confirmation "
                "keeps only its best finalist's best seed (and none of a baseline's). To get "
                f"it, {how}")
    why = (f"it was stopped early (pruned at step {row.get('final_step', row.get('step'))}), "
           "so a rebuild trains it to the end" if status == "pruned"
           else f"the search keeps the best {keep} (keep: {{best: {keep}}} in the space)")
    return f"{report}: trial {trial_id}'s model was not kept: {why}. To get it, {how}"


def _copy(source, target: Path, merge: bool, extra: dict) -> Path:
    staging = staging_beside(target)
    local = staging.with_name(staging.name + "-download")  # a remote adapter, for peft
    try:
        meta = read_meta(source)
        if merge and meta.get("format") == "lora":
            if is_remote(source):  # peft reads a local folder
                source.download(local)
                source = local
            _merge_adapter(source, staging)
            meta.update(format="merged", load="transformers.AutoModelForCausalLM."
                                              "from_pretrained(DIR)")
        elif is_remote(source):
            source.download(staging)
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        meta.pop("keep", None)  # a copy is nobody's kept model
        write_meta(staging, {**meta, "exported_from": extra})
        return publish(staging, target)
    finally:
        for folder in (staging, local):
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)


def _merge_adapter(source: Path, out: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    AutoPeftModelForCausalLM.from_pretrained(source, dtype="auto").merge_and_unload(
    ).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def trial_config(report: Path, rep, row):
    """The exact training config a trial of the report ran: the space in search.json with the
    trial's searched values (a `raypo train` report: its config)."""
    from raypo.reports.schema import searched_values
    from raypo.search.space import parse_space
    from raypo.train.config import TrainConfig

    meta = rep.meta
    if meta.get("kind") == "train":
        return TrainConfig.model_validate(meta["config"])
    if isinstance(row.get("role"), str):  # a confirmation run: its config is in the plan
        from raypo.search.confirm import run_config

        cfg = run_config(report, str(row["trial_id"]))
        if cfg is None:
            raise ExportError(f"{report}: confirmation run {row['trial_id']} is not in "
                              "confirm_plan.json")
        return cfg
    if "space" not in meta or not isinstance(row.get("searched"), str):
        raise ExportError(f"{report}: the settings of trial {row['trial_id']} are not in the "
                          "report (search.json's space and the row's `searched` values)")
    return parse_space(meta["space"], meta.get("source", "<space>")).config(
        searched_values(row))


def _rebuild(report: Path, rep, row, target: Path, merge: bool, log) -> Path:
    from raypo.train.run import run_trial

    trial_id = str(row["trial_id"])
    if row.get("status") == "failed":
        raise ExportError(_not_kept(report, rep, row))
    cfg = trial_config(report, rep, row)
    log(f"{report}: rebuilding trial {trial_id} ({cfg.loss.name}, seed {cfg.seed}, "
        f"{cfg.steps} steps)")
    save = ModelSave(target, merge=merge, meta={"report": str(report.resolve()),
                                                "trial_id": trial_id, "rebuilt": True})
    again, _ = run_trial(cfg, trial_id, save=save, log=log)
    if again["status"] != "ok":
        raise ExportError(f"{report}: rebuilding trial {trial_id} failed: {again['error']}")
    metric = (rep.meta.get("objectives") or [{"metric": "objective"}])[0]["metric"]
    before, now = row.get(metric), again.get(metric)
    if isinstance(before, float) and isinstance(now, float) and math.isfinite(before):
        log(f"rebuilt: {metric} {now:.6g} (the trial recorded {before:.6g})")
    return target

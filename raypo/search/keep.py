"""Which trained models a search keeps: the best `best` runs by the objective, or every finished
one, under `<report>/models/<run_id>/` (Hugging Face folders with raypo.json, see
raypo.models.save).

The run's own process writes its model to a staging folder under the report
(`staging_path(report, run_id)`, written whole by a rename; on object storage uploaded from the
trial's node with raypo.json last, so a folder with raypo.json is whole); the driver, the only
writer of the report, then `offer`s it: the keeper moves it into `models/` if it is among the
best (a rename, or on object storage a server-side copy with raypo.json last, then a delete),
removes the kept models it pushes out, and removes it otherwise. What is kept is read back from the
folders themselves (each raypo.json says its group, objective and direction), so a resumed
search, or another stage of the same report, needs no saved state.

    keeper = ModelKeeper(report_dir, best=1, mode="max", metric="true_reward")
    changes = keeper.offer(run_id, objective)   # {run_id: "models/<id>" or None, ...}

`changes` holds the model path of every run whose path changed (the offered one; those pushed
out get None): what the caller writes to trials.parquet's `model_path`. Keepers of different
`group`s (a search's trials, a confirmation stage's runs) share `models/` without seeing each
other's models.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from raypo.models.save import META, is_saved_model, publish, read_meta, write_meta
from raypo.storage import is_remote, location, move_tree, rmtree

MODELS = "models"
STAGING = ".staging"


def staging_path(report_dir, run_id: str):
    """Where a run writes its model for the keeper to offer (same file system as models/)."""
    return location(report_dir) / MODELS / STAGING / run_id


def staged_save(report_dir, run_id: str, meta: dict):
    """Where a run writes the model the keeper may keep: the report's staging folder itself
    on a local (or NFS) report, or, on object storage, a local folder uploaded there when the
    run finishes (UploadedSave)."""
    from raypo.models.save import ModelSave

    target = staging_path(report_dir, run_id)
    if is_remote(target):
        return UploadedSave(target, meta)
    return ModelSave(target, meta=meta)


class UploadedSave:
    """A ModelSave for a report on object storage: the model is written on the node that
    trains it, then uploaded to `target` with raypo.json last (so the keeper, which looks for
    raypo.json, never takes half a model). With several Ray Train workers, rank 0 uploads the
    weights itself (`remote_weights`) and `finish` adds raypo.json."""

    merge = False

    def __init__(self, target, meta: dict):
        import tempfile

        from raypo.models.save import ModelSave

        self.target = target
        self.directory = target
        self.remote_weights = str(target)
        self._uploaded_by_worker = False  # a Ray Train rank 0 sent the weights itself
        self._local = ModelSave(Path(tempfile.mkdtemp(prefix="raypo-model-")) / "model",
                                meta=meta)

    def check(self) -> None:
        self._local.check()

    def staging(self) -> Path:
        return self._local.staging()

    def write_weights(self, policy, tokenizer, cfg) -> None:
        self._local.write_weights(policy, tokenizer, cfg)

    def weights_written(self, fmt: str) -> None:
        self._local.weights_written(fmt)
        self._uploaded_by_worker = True

    def finish(self, cfg, row: dict):
        local = self._local
        try:
            if self._uploaded_by_worker:
                fmt = local._format
                local.discard()
                if row.get("status") != "ok" or fmt is None:
                    rmtree(self.target)
                    return None
                import raypo
                from raypo.models.save import loader_of

                write_meta(self.target, {"format": fmt, "load": loader_of(fmt),
                                         "base_model": cfg.model or "tiny",
                                         "raypo": raypo.__version__, **local.meta,
                                         "config": cfg.model_dump(mode="json"),
                                         "metrics": row})
                return self.target
            folder = local.finish(cfg, row)
            if folder is None:
                return None
            self.target.upload(folder, last=META)
            return self.target
        finally:
            rmtree(local.directory.parent)


class ModelKeeper:
    """Keeps the `best` best models by `metric` in direction `mode` ("max" or "min"); `best`
    None keeps every finished run's, 0 none. Ties keep the model kept first."""

    def __init__(self, report_dir: str | Path, best: int | None, mode: str, metric: str,
                 group: str = "search"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.report_dir = location(report_dir)
        self.best, self.mode, self.metric, self.group = best, mode, metric, group

    @property
    def wants_models(self) -> bool:
        """Whether runs should write a model at all."""
        return self.best != 0

    @property
    def models_dir(self):
        return self.report_dir / MODELS

    def staging(self, run_id: str):
        return staging_path(self.report_dir, run_id)

    def relative(self, run_id: str) -> str:
        """A kept model's path relative to the report folder (what trials.parquet holds)."""
        return f"{MODELS}/{run_id}"

    def kept(self) -> dict[str, float]:
        """{run_id: objective} of this group's kept models, in the order they were kept."""
        found = []
        if self.models_dir.is_dir():
            for folder in self.models_dir.iterdir():
                if folder.name.startswith(".") or not is_saved_model(folder):
                    continue
                keep = read_meta(folder).get("keep") or {}
                if keep.get("group") == self.group:
                    found.append((keep.get("order", 0), folder.name, float(keep["objective"])))
        return {run_id: objective for _, run_id, objective in sorted(found)}

    def offer(self, run_id: str, objective: float | None) -> dict[str, str | None]:
        """Keep or drop the model `run_id` staged; a run without a finite objective (failed,
        pruned) or without a staged model is not kept. Returns the changed model paths."""
        staged = self.staging(run_id)
        kept = self.kept()
        changes: dict[str, str | None] = {run_id: None}
        ok = (objective is not None and math.isfinite(objective) and is_saved_model(staged)
              and self.wants_models)
        if ok:
            candidates = {**{k: v for k, v in kept.items() if k != run_id}, run_id: objective}
            winners = set(self._best_of(candidates))
        else:
            winners = {k for k in kept if k != run_id}
        if ok and run_id in winners:
            meta = read_meta(staged)
            meta["keep"] = {"group": self.group, "metric": self.metric, "mode": self.mode,
                            "objective": objective, "order": self._next_order()}
            write_meta(staged, meta)
            self._publish(staged, self.models_dir / run_id)
            changes[run_id] = self.relative(run_id)
        elif run_id in kept:  # a re-run that is no longer kept: its old model goes too
            rmtree(self.models_dir / run_id)
        for other in kept:
            if other != run_id and other not in winners:
                rmtree(self.models_dir / other)
                changes[other] = None
        self.discard(run_id)
        return changes

    def drop_all(self) -> list[str]:
        """Remove every model of this group; returns their run ids."""
        kept = list(self.kept())
        for run_id in kept:
            rmtree(self.models_dir / run_id)
        return kept

    def discard(self, run_id: str) -> None:
        """Remove what `run_id` staged, including temporary folders of a killed write."""
        staged = self.staging(run_id)
        rmtree(staged)
        if not is_remote(staged) and staged.parent.is_dir():
            for leftover in staged.parent.glob(f".{run_id}.*"):
                rmtree(leftover)

    @staticmethod
    def _publish(staged, target) -> None:
        """The staged folder becomes the kept one, whole (raypo.json last on object storage,
        where a kept folder of the same name is removed first)."""
        if is_remote(staged):
            rmtree(target)
            move_tree(staged, target, last=META)
        else:
            publish(staged, target)

    def _best_of(self, candidates: dict[str, float]) -> list[str]:
        if self.best is None:
            return list(candidates)
        sign = -1.0 if self.mode == "max" else 1.0
        # sorted is stable: among equal objectives the one kept first stays
        ranked = sorted(candidates, key=lambda k: sign * candidates[k])
        return ranked[:self.best]

    def _next_order(self) -> int:
        orders = [read_meta(f).get("keep", {}).get("order", 0)
                  for f in self.models_dir.iterdir() if is_saved_model(f)
                  ] if self.models_dir.is_dir() else []
        return max(orders, default=0) + 1


def forget_missing(writer) -> None:
    """Rows whose `model_path` names no saved model any more get it null, so the table says
    what is there: a driver killed between removing a model another pushed out and writing
    that model's row leaves such a row, and the resumed stage mends it at its end."""
    trials = writer.trials
    if trials.empty or "model_path" not in trials:
        return
    for run_id, path in zip(trials["trial_id"], trials["model_path"], strict=True):
        if isinstance(path, str) and path and not is_saved_model(writer.directory / path):
            writer.update_trial(run_id, model_path=None)


def finalist_keeper(report_dir: str | Path, config_id: str, keep: int | None, mode: str,
                    metric: str) -> ModelKeeper:
    """The keeper of one confirmation finalist's runs (its own group): its best seed's model,
    or with `keep: all` (`keep` None) every seed's (raypo.search.confirm)."""
    return ModelKeeper(report_dir, best=None if keep is None else 1, mode=mode, metric=metric,
                       group=f"confirm:{config_id}")


def remove_empty_staging(report_dir) -> None:
    """The staging folder once nothing is left in it (the end of a search; on object storage
    the empty-folder marker pyarrow leaves)."""
    folder = location(report_dir) / MODELS / STAGING
    if is_remote(folder):
        if not folder.files():
            folder.rmtree()
    elif folder.is_dir() and not any(folder.iterdir()):
        os.rmdir(folder)

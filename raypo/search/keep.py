"""Which trained models a search keeps: the best `best` runs by the objective, or every finished
one, under `<report>/models/<run_id>/` (Hugging Face folders with raypo.json, see
raypo.models.save).

The run's own process writes its model to a staging folder under the report
(`staging_path(report, run_id)`, written whole by a rename); the driver, the only writer of the
report, then `offer`s it: the keeper moves it into `models/` if it is among the best, removes
the kept models it pushes out, and removes it otherwise. What is kept is read back from the
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
import shutil
from pathlib import Path

from raypo.models.save import is_saved_model, publish, read_meta, write_meta

MODELS = "models"
STAGING = ".staging"


def staging_path(report_dir: str | Path, run_id: str) -> Path:
    """Where a run writes its model for the keeper to offer (same file system as models/)."""
    return Path(report_dir) / MODELS / STAGING / run_id


class ModelKeeper:
    """Keeps the `best` best models by `metric` in direction `mode` ("max" or "min"); `best`
    None keeps every finished run's, 0 none. Ties keep the model kept first."""

    def __init__(self, report_dir: str | Path, best: int | None, mode: str, metric: str,
                 group: str = "search"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.report_dir = Path(report_dir)
        self.best, self.mode, self.metric, self.group = best, mode, metric, group

    @property
    def wants_models(self) -> bool:
        """Whether runs should write a model at all."""
        return self.best != 0

    @property
    def models_dir(self) -> Path:
        return self.report_dir / MODELS

    def staging(self, run_id: str) -> Path:
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
            publish(staged, self.models_dir / run_id)
            changes[run_id] = self.relative(run_id)
        elif run_id in kept:  # a re-run that is no longer kept: its old model goes too
            shutil.rmtree(self.models_dir / run_id, ignore_errors=True)
        for other in kept:
            if other != run_id and other not in winners:
                shutil.rmtree(self.models_dir / other, ignore_errors=True)
                changes[other] = None
        self.discard(run_id)
        return changes

    def drop_all(self) -> list[str]:
        """Remove every model of this group; returns their run ids."""
        kept = list(self.kept())
        for run_id in kept:
            shutil.rmtree(self.models_dir / run_id, ignore_errors=True)
        return kept

    def discard(self, run_id: str) -> None:
        """Remove what `run_id` staged, including temporary folders of a killed write."""
        staged = self.staging(run_id)
        shutil.rmtree(staged, ignore_errors=True)
        if staged.parent.is_dir():
            for leftover in staged.parent.glob(f".{run_id}.*"):
                shutil.rmtree(leftover, ignore_errors=True)

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


def finalist_keeper(report_dir: str | Path, config_id: str, keep: int | None, mode: str,
                    metric: str) -> ModelKeeper:
    """The keeper of one confirmation finalist's runs (its own group): its best seed's model,
    or with `keep: all` (`keep` None) every seed's (raypo.search.confirm)."""
    return ModelKeeper(report_dir, best=None if keep is None else 1, mode=mode, metric=metric,
                       group=f"confirm:{config_id}")


def remove_empty_staging(report_dir: str | Path) -> None:
    """The staging folder once nothing is left in it (the end of a search)."""
    folder = Path(report_dir) / MODELS / STAGING
    if folder.is_dir() and not any(folder.iterdir()):
        os.rmdir(folder)

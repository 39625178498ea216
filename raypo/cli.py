"""The `raypo` command line: train (search, select, report and metrics follow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find the best DPO variant for a model and a preference dataset.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def main() -> None:
    """raypo: DPO-variant search with Ray Tune + Optuna."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (a search space, all fixed)")],
    set_: Annotated[list[str], typer.Option("--set", help="override: key=value")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="final metrics as JSON")] = False,
    name: Annotated[str | None, typer.Option(help="report name (default: config's)")] = None,
) -> None:
    """Train one DPO variant; write a one-trial report under reports/<name>/."""
    from tqdm import tqdm

    from raypo.data.errors import DataError
    from raypo.reports import ReportWriter
    from raypo.train.config import ConfigError, load_config
    from raypo.train.run import run_trial

    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        _fail(str(e))
    if name:
        cfg = cfg.model_copy(update={"name": name})
    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    bar = tqdm(total=cfg.steps, desc=f"train {cfg.loss.name}", file=sys.stderr,
               dynamic_ncols=True)

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    def on_eval(step, metrics):
        shown = {k: metrics[k] for k in ("pref_accuracy", "true_reward", "kl") if k in metrics}
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()),
                  file=sys.stderr)

    try:
        row, history = run_trial(cfg, "train", log=log, on_eval=on_eval, progress=progress)
    except (DataError, ConfigError) as e:
        bar.close()
        _fail(str(e))
    bar.close()
    out = Path(cfg.reports) / cfg.name
    writer = ReportWriter(out, search=cfg.name)
    writer.write_trial(row, history)
    writer.write_meta({"kind": "train", "config": cfg.model_dump(mode="json")})
    log(f"report: {out}")
    if row["status"] != "ok":
        _fail(row["error"], code=1)
    if as_json:
        keys = ("pref_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl",
                "true_reward", "ref_true_reward", "tokens_per_s", "wall_s", "objective",
                "eval_loss", "htsr_alpha_mean")
        typer.echo(json.dumps({k: row.get(k) for k in keys if k in row}))

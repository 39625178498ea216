"""The `raypo` command line: search, select, report, metrics and train."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find the best DPO variant for a model and a preference dataset.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)  # one line
    raise typer.Exit(code)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@app.callback()
def main() -> None:
    """raypo: DPO-variant search with Ray Tune + Optuna."""
    import warnings

    warnings.formatwarning = _warning_line  # raypo's warnings read as one line, not a trace


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (a search space, all fixed)")],
    set_: Annotated[list[str], typer.Option("--set", help="override: key=value")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="final metrics as JSON")] = False,
    name: Annotated[str | None, typer.Option(help="report name (default: config's)")] = None,
) -> None:
    """Train one DPO variant; write a one-trial report under reports/<name>/."""
    from raypo.data.errors import DataError
    from raypo.reports.folder import ReportFolderError, train_folder
    from raypo.reports.lock import LockedError, ReportLock
    from raypo.reports.writer import ReportWriteError
    from raypo.search.interrupt import Interrupted, Interrupts
    from raypo.train.config import ConfigError, load_config, name_problem

    if name is not None and name_problem(name):
        _fail(f"--name: {name_problem(name)}")
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        _fail(str(e))
    if name:
        cfg = cfg.model_copy(update={"name": name})
    out = Path(cfg.reports) / cfg.name
    try:
        with Interrupts(), ReportLock(out, "train"):
            writer = train_folder(out, cfg.name)  # before training: a report it may write
            row, history = _train_run(cfg)
            writer.write_trial(row, history)
            writer.write_meta({"kind": "train", "config": cfg.model_dump(mode="json")})
    except (DataError, ConfigError, LockedError, ReportFolderError, ReportWriteError) as e:
        _fail(str(e))
    except Interrupted as e:
        _fail(f"{e}: the run stopped before its end; nothing was written to {out}",
              code=e.exit_code)
    typer.echo(f"report: {out}", err=True)
    if row["status"] != "ok":
        _fail(row["error"], code=1)
    if as_json:
        keys = ("pref_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "kl",
                "true_reward", "ref_true_reward", "tokens_per_s", "wall_s", "objective",
                "eval_loss", "htsr_alpha_mean")
        typer.echo(json.dumps({k: row.get(k) for k in keys if k in row}))


def _train_run(cfg):
    """The run itself, with a progress bar on stderr (made at the first step, so that an
    error before training shows alone)."""
    from tqdm import tqdm

    from raypo.train.run import run_trial

    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    bars = []

    def progress(step, loss):
        if not bars:
            bars.append(tqdm(total=cfg.steps, desc=f"train {cfg.loss.name}", file=sys.stderr,
                             dynamic_ncols=True, initial=step - 1))
        bars[0].update(1)
        bars[0].set_postfix(loss=f"{loss:.4f}")

    def on_eval(step, metrics):
        shown = {k: metrics[k] for k in ("pref_accuracy", "true_reward", "kl") if k in metrics}
        text = f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items())
        if bars:
            bars[0].write(text, file=sys.stderr)
        else:
            log(text)

    try:
        return run_trial(cfg, "train", log=log, on_eval=on_eval, progress=progress)
    finally:
        for bar in bars:
            bar.close()


@app.command()
def search(
    space: Annotated[Path, typer.Argument(help="YAML search space (search_spaces/*.yaml)")],
    model: Annotated[str | None, typer.Option(help="hub name or local folder")] = None,
    data: Annotated[str | None, typer.Option(help="preference data: file, folder, hub")] = None,
    samples: Annotated[int | None, typer.Option(help="number of trials (budget.trials)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster ('auto' after ray up)")] = None,
    name: Annotated[str | None, typer.Option(help="report name (default: the space's)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted search")] = False,
    reports: Annotated[Path, typer.Option(help="folder of reports")] = Path("reports"),
) -> None:
    """Search the space with Ray Tune + Optuna; write reports/<name>/*.parquet."""
    import os

    if address is None and "ray" not in sys.modules:
        # a local instance listens on loopback only (Ray reads this when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from raypo.data.errors import DataError
    from raypo.reports.folder import ReportFolderError, search_folder
    from raypo.reports.lock import LockedError, ReportLock
    from raypo.reports.writer import ReportWriteError
    from raypo.search.interrupt import Interrupted
    from raypo.search.run import run_search
    from raypo.search.space import SpaceError, load_space
    from raypo.train.config import ConfigError, name_problem

    overrides = {"model": model, "data": data, "name": name,
                 "budget.trials": samples}
    if samples is not None and samples < 1:
        _fail("--samples: expected a positive number of trials")
    if name is not None and name_problem(name):
        _fail(f"--name: {name_problem(name)}")
    try:
        parsed = load_space(space, overrides)
        with ReportLock(reports / parsed.name, "search"):
            search_folder(reports / parsed.name, resume)  # writable, not another kind's
            out = run_search(parsed, reports=reports, address=address, resume=resume)
    except (SpaceError, ConfigError, DataError, LockedError, ReportFolderError,
            ReportWriteError) as e:
        _fail(str(e))
    except Interrupted as e:
        _fail(str(e), code=e.exit_code)
    from raypo.reports import load

    report = load(out)
    counts = report.trials["status"].value_counts().to_dict()
    typer.echo(f"report: {out}  ({', '.join(f'{v} {k}' for k, v in counts.items())})",
               err=True)
    objectives = report.meta["objectives"]
    if len(objectives) == 2 and len(report.ok):
        metrics = [o["metric"] for o in objectives]
        front = report.pareto()[["trial_id", *metrics]]
        typer.echo(f"Pareto front ({' vs '.join(metrics)}):\n{front.to_string(index=False)}",
                   err=True)
    elif len(report.ok):
        best = report.best()
        typer.echo(f"best: {best['trial_id']} {objectives[0]['metric']} "
                   f"{best['objective']:.4f}", err=True)
    typer.echo(str(out))


@app.command()
def select(
    report: Annotated[Path, typer.Argument(help="a report folder (reports/<name>)")],
    top: Annotated[int, typer.Option(help="how many pairs to show")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list on the last line")]
    = False,
) -> None:
    """The chosen kernel-divergence pair(s) of a search, with the evidence."""
    import json
    import math

    from raypo.reports import load

    if top < 1:
        _fail("--top: expected a positive number")
    try:
        rep = load(report)
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(str(e))
    from raypo.reports.status import incomplete_note

    if incomplete_note(rep):  # a part of a search is not the search: say so first
        typer.echo(f"note: {incomplete_note(rep)}", err=True)
    pairs = rep.pairs()
    if pairs.empty:
        _fail(f"{report}: no finished trial of a kernel loss to choose from; "
              f"{len(rep.trials)} trials in the report")
    chosen = pairs.head(top)
    metric = rep.objective["metric"]
    rows = [{"kernel": r.kernel, "divergence": r.divergence, "objective": r.objective,
             "metric": metric,
             "std": None if math.isnan(r.std) else r.std, "best": r.best,
             "trials": int(r.trials),
             "predicted_rank": None if math.isnan(r.predicted_rank) else int(r.predicted_rank)}
            for r in chosen.itertuples()]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    total = len(rep.trials)
    typer.echo(f"{rep.meta.get('name', report)}: {len(pairs)} kernel-divergence pairs tried "
               f"in {total} trials; objective {metric} ({rep.objective['mode']})")
    for i, r in enumerate(rows, 1):
        spread = "" if r["std"] is None else f" ± {r['std']:.4f}"
        rank = "-" if r["predicted_rank"] is None else r["predicted_rank"]
        typer.echo(f"{i}. kernel {r['kernel']}, divergence {r['divergence']}: "
                   f"{metric} {r['objective']:.4f}{spread} (best {r['best']:.4f}, "
                   f"{r['trials']} trial{'s' * (r['trials'] != 1)}, predicted rank {rank})")


@app.command("report")
def report_command(
    report: Annotated[Path, typer.Argument(help="a report folder: reports/<name>")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default: REPORT/report.html)")]
    = None,
) -> None:
    """Write one self-contained HTML page (figures inline, no network) for a report."""
    from raypo.reports import load
    from raypo.reports.html import write_html

    if not report.is_dir():
        _fail(f"{report}: not a folder (give a report folder such as reports/<name>)")
    try:
        loaded = load(report)
    except FileNotFoundError as e:
        _fail(str(e))
    except (OSError, ValueError) as e:  # unreadable Parquet or search.json (named)
        _fail(f"cannot read the report: {e}")
    target = out or report / "report.html"
    try:
        typer.echo(str(write_html(loaded, target)))
    except OSError as e:  # a read-only folder, a full disk: nothing half-written
        _fail(f"{target}: cannot write: {e.strerror or e}")


@app.command("metrics")
def metrics_command(
    model: Annotated[str | None, typer.Option(help="model: hub name or local folder "
                                              "(default: the tiny built-in model)")] = None,
    data: Annotated[str | None, typer.Option(help="preference data: file, folder or hub "
                                             "name (default: the built-in task)")] = None,
    config: Annotated[Path | None, typer.Option(help="a training config or search space "
                                                "YAML (its model, data and task keys)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override: key=value")] = [],  # noqa: B006
    max_pairs: Annotated[int, typer.Option(min=2, help="pairs the metrics are computed on "
                                           "(a seeded subset)")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="the table as one JSON list on the "
                                          "last line")] = False,
) -> None:
    """Selection metrics of the data and the reference model, and the predicted ranking of
    the 28 kernel-divergence pairs; no training."""
    from raypo.data.errors import DataError
    from raypo.search.evidence import describe, metrics_config, selection_table
    from raypo.train.config import ConfigError, parse_overrides

    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    try:
        cfg = metrics_config(config, model=model, data=data,
                             overrides=dict(parse_overrides(set_)))
        table = selection_table(cfg, max_pairs=max_pairs, log=log)
    except (DataError, ConfigError, ValueError) as e:  # ValueError: a model that cannot load
        _fail(str(e))
    typer.echo(describe(table))
    if as_json:
        typer.echo(table.to_json(orient="records"))

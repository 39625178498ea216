"""The `raypo` command line: search, select, report, metrics, train and export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from raypo.errors import RaypoError


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)  # one line
    raise typer.Exit(code)


class _Commands(TyperGroup):
    """Every command's RaypoError (bad input, a report it must not write, ...) ends here, once:
    its message on one line and its exit status (raypo.errors)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RaypoError as e:
            _fail(str(e), e.exit_status)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Find the best DPO variant for a model and a preference dataset.")


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
    save: Annotated[Path | None, typer.Option(help="write the trained policy here: a Hugging "
                                              "Face folder (LoRA: the adapter) + raypo.json")]
    = None,
    merge: Annotated[bool, typer.Option(help="with --save and LoRA: merged weights, not the "
                                        "adapter")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="print the run's memory plan (its "
                                       "peak device memory, part by part) and exit; exit "
                                       "code 2 when it cannot fit this machine's GPU")]
    = False,
) -> None:
    """Train one DPO variant; write a one-trial report under reports/<name>/."""
    from raypo.reports.folder import train_folder
    from raypo.reports.lock import ReportLock
    from raypo.search.interrupt import Interrupted, Interrupts
    from raypo.search.space import load_fixed
    from raypo.train.config import name_problem, parse_overrides

    if name is not None and name_problem(name):
        _fail(f"--name: {name_problem(name)}")
    cfg = load_fixed(config, parse_overrides(set_))
    if name:
        cfg = cfg.model_copy(update={"name": name})
    if plan:
        return _print_plan(cfg)
    _check_run_memory(cfg)  # on a GPU, before anything is loaded: a run that cannot fit
    model_save = _model_save(save, merge, cfg, lambda msg: typer.echo(msg, err=True))
    out = Path(cfg.reports) / cfg.name
    try:
        with Interrupts(), ReportLock(out, "train"):
            writer = train_folder(out, cfg.name)  # before training: a report it may write
            row, history = _train_run(cfg, model_save)
            writer.write_trial(row, history)
            writer.write_meta({"kind": "train", "config": cfg.model_dump(mode="json")})
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


def _check_run_memory(cfg) -> None:
    """PlanError (a ConfigError) when a GPU run of `cfg` cannot fit its GPU; nothing on a
    CPU (raypo.train.plan)."""
    from raypo.train.plan import check, estimate, local_gpu

    gpu = local_gpu(cfg)
    if gpu is not None:
        check(estimate(cfg), *gpu)


def _print_plan(cfg) -> None:
    """`raypo train --plan`: the plan against this machine's GPU, if the run would use one."""
    from raypo.train.plan import estimate, local_gpu

    gpu = local_gpu(cfg)
    plan = estimate(cfg, device="cpu" if gpu is None else "cuda")
    typer.echo(f"memory plan of {cfg.name}:")
    if gpu is None:
        typer.echo(plan.describe(against="a CPU run: not checked against memory"))
        return
    typer.echo(plan.describe(*gpu))
    if not plan.fits(gpu[0]):
        _fail(f"the memory plan does not fit {gpu[1]}")


def _print_space_plan(space) -> None:
    """`raypo search --plan` (raypo.search.checks.plan_report); exit 2 when it cannot fit."""
    from raypo.search.checks import plan_report

    text, failure = plan_report(space)
    typer.echo(text)
    if failure:
        _fail(failure)


def _model_save(save: Path | None, merge: bool, cfg, log):
    """The --save target, checked before training (a refused folder costs no training)."""
    from raypo.models.save import ModelSave, SaveError

    if save is None:
        if merge:
            _fail("--merge: only with --save DIR")
        return None
    if merge and cfg.lora is None:
        log("--merge: no LoRA adapters in this config; the full model is saved")
    target = ModelSave(save, merge=merge,
                       meta={"report": str((Path(cfg.reports) / cfg.name).resolve()),
                             "trial_id": "train"})
    try:
        target.check()
    except SaveError as e:
        _fail(f"--save {e}")
    return target


def _train_run(cfg, model_save=None):
    """The run itself, with a progress bar on stderr (made at the first step, so that an
    error before training shows alone); `model_save` writes the trained policy."""
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

    from raypo.reports.schema import trial_row

    try:
        result, history = run_trial(cfg, "train", log=log, on_eval=on_eval, progress=progress,
                                    save=model_save)
        row = trial_row(cfg, result)
        if model_save is not None and row["status"] == "ok":
            row["model_path"] = str(model_save.directory)  # what `raypo export` copies
        return row, history
    finally:
        for bar in bars:
            bar.close()


@app.command()
def search(
    space: Annotated[Path, typer.Argument(help="YAML search space (search_spaces/*.yaml)")],
    model: Annotated[str | None, typer.Option(help="hub name or local folder")] = None,
    data: Annotated[str | None, typer.Option(help="preference data: file, folder, hub")] = None,
    judge: Annotated[str | None, typer.Option(help="the reward model judging samples "
                                              "(judge.model): hub name, local folder or "
                                              "builtin")] = None,
    samples: Annotated[int | None, typer.Option(help="number of trials (budget.trials)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster ('auto' after ray up)")] = None,
    name: Annotated[str | None, typer.Option(help="report name (default: the space's)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted search")] = False,
    reports: Annotated[str, typer.Option(
        envvar="RAYPO_REPORTS", help="where reports go: a folder (on a cluster, one every "
        "node mounts: NFS/EFS), or s3://bucket/prefix, gs://bucket/prefix")] = "reports",
    confirm: Annotated[bool | None, typer.Option(
        "--confirm/--no-confirm", help="run the confirmation stage after the search "
        "(default: when the space has a `confirm:` section)")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="print the memory plan of the space's "
                                       "most demanding trial and exit; exit code 2 when it "
                                       "cannot fit")] = False,
    track: Annotated[list[str] | None, typer.Option(
        "--track", help="also send each trial's config and evaluations to mlflow, wandb or "
        "tensorboard (repeat it, or a comma list; added to the space's `tracking:`)")] = None,
) -> None:
    """Search the space with Ray Tune + Optuna; write reports/<name>/*.parquet."""
    import os

    if address is None and "ray" not in sys.modules:
        # a local instance listens on loopback only (Ray reads this when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from raypo.reports.folder import search_folder
    from raypo.reports.lock import ReportLock
    from raypo.search.interrupt import Interrupted
    from raypo.search.pipeline import search_and_confirm
    from raypo.search.space import load_space
    from raypo.search.tracking import check_packages, parse_track, with_tracking
    from raypo.storage import StorageError, location
    from raypo.train.config import name_problem

    overrides = {"model": model, "data": data, "judge.model": judge, "name": name,
                 "budget.trials": samples}
    if samples is not None and samples < 1:
        _fail("--samples: expected a positive number of trials")
    if name is not None and name_problem(name):
        _fail(f"--name: {name_problem(name)}")
    if plan:
        return _print_space_plan(load_space(space, overrides))
    try:
        root = location(reports)
        parsed = with_tracking(load_space(space, overrides), parse_track(track))
        check_packages(parsed.settings.tracking)  # before the report folder is touched
        with ReportLock(root / parsed.name, "search"):
            search_folder(root / parsed.name, resume)  # writable, not another kind's
            out = search_and_confirm(parsed, reports=reports, address=address,
                                     resume=resume, confirm=confirm)
    except StorageError as e:
        _fail(f"--reports {e}")
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
                   f"{best['objective']:.4f} (single seed)", err=True)
    if report.verdict:
        typer.echo(f"verdict: {report.verdict}", err=True)
    typer.echo(str(out))


@app.command()
def select(
    report: Annotated[str, typer.Argument(help="a report folder (reports/<name>, or "
                                          "s3://bucket/prefix/<name>)")],
    top: Annotated[int, typer.Option(help="how many pairs (or trials) to show")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on the last line")]
    = False,
) -> None:
    """The chosen variant of a search and how sure it is: the confirmation's verdict (the
    finalists against the baseline over several seeds) or, without one, the single-seed
    ranking of kernel-divergence pairs (or of trials). The ranking compares every trial,
    pruned ones included, at the highest step all of them reached (Report.at_common_step)."""
    from raypo.reports import load
    from raypo.reports.selecting import select_output

    if top < 1:
        _fail("--top: expected a positive number")
    try:
        rep = load(report)
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(str(e))
    out, note = select_output(rep, report, top, as_json=as_json)
    if note:  # a part of a search is not the search: say so first
        typer.echo(f"note: {note}", err=True)
    typer.echo(out)


@app.command()
def confirm(
    report: Annotated[str, typer.Argument(help="a search's report folder (reports/<name>, "
                                          "or s3://bucket/prefix/<name>)")],
    top: Annotated[int | None, typer.Option(help="finalists (confirm.top)")] = None,
    seeds: Annotated[int | None, typer.Option(help="seeds per configuration")] = None,
    baseline: Annotated[str | None, typer.Option(help="the baseline loss (default dpo)")]
    = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster ('auto' after ray up)")] = None,
) -> None:
    """Train the search's best configurations and their baselines under several seeds and say
    whether any beats the baseline beyond seed noise (resumes an interrupted confirmation)."""
    import os

    if address is None and "ray" not in sys.modules:
        # a local instance listens on loopback only (Ray reads this when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from raypo.reports import load
    from raypo.reports.lock import ReportLock
    from raypo.search.confirm import run_confirmation
    from raypo.search.interrupt import Interrupted
    from raypo.search.settings import Confirm
    from raypo.search.space import parse_space

    try:
        rep = load(report)
    except (FileNotFoundError, OSError, ValueError) as e:  # StorageError is a ValueError
        _fail(str(e))
    if rep.meta.get("kind") != "search" or "space" not in rep.meta:
        _fail(f"{report}/search.json: not the report of a search (no space recorded)")
    try:
        space = parse_space(rep.meta["space"], rep.meta.get("source", str(report)))
        settings = (space.settings.confirm or Confirm()).model_dump()
        settings.update({k: v for k, v in {"top": top, "seeds": seeds}.items()
                         if v is not None})
        if baseline:
            settings["baseline"] = {"name": baseline}
        with ReportLock(rep.path, "confirm"):  # one writer per report
            result = run_confirmation(space, rep.path, Confirm.model_validate(settings),
                                      address=address)
    except Interrupted as e:
        _fail(str(e), code=e.exit_code)
    except RaypoError:
        raise  # its own message (the command line's handler)
    except ValueError as e:  # pydantic: a bad --top/--seeds/--baseline
        _fail(f"confirm: {e}")
    typer.echo(f"verdict: {result['verdict']}", err=True)
    if result["status"] != "finished":
        _fail(f"confirmation incomplete ({result['missing_runs']} runs missing); continue "
              f"with: {result['resume']}", code=1)
    typer.echo(str(report))


@app.command("report")
def report_command(
    report: Annotated[str, typer.Argument(help="a report folder: reports/<name>, or "
                                          "s3://bucket/prefix/<name>")],
    out: Annotated[Path | None, typer.Option(
        "-o", "--out", help="HTML file (default: REPORT/report.html; for a report on object "
        "storage <name>.html in the working directory, never into the bucket)")] = None,
) -> None:
    """Write one self-contained HTML page (figures inline, no network) for a report."""
    from raypo.reports import load
    from raypo.reports.html import write_html
    from raypo.storage import StorageError, is_remote, location

    try:
        folder = location(report)
        if not folder.is_dir():
            _fail(f"{report}: not a folder (give a report folder such as reports/<name>)")
        loaded = load(folder)
    except FileNotFoundError as e:
        _fail(str(e))
    except (OSError, ValueError, StorageError) as e:  # unreadable Parquet or search.json
        _fail(f"cannot read the report: {e}")
    # a report on object storage may be a running search's: the page goes here, not there
    target = out or (Path(f"{folder.name}.html") if is_remote(folder)
                     else folder / "report.html")
    try:
        typer.echo(str(write_html(loaded, target)))
    except OSError as e:  # a read-only folder, a full disk: nothing half-written
        _fail(f"{target}: cannot write: {e.strerror or e}")


@app.command("export")
def export_command(
    report: Annotated[str, typer.Argument(help="a report folder: reports/<name>, or "
                                          "s3://bucket/prefix/<name> (downloaded)")],
    out: Annotated[Path, typer.Argument(help="the folder to write the model to")],
    trial: Annotated[str | None, typer.Option(help="trial id (default: the best trial)")]
    = None,
    rebuild: Annotated[bool, typer.Option(help="re-train the trial's config if its model was "
                                          "not kept")] = False,
    merge: Annotated[bool, typer.Option(help="a LoRA adapter comes out merged")] = False,
) -> None:
    """Copy a kept model of a report (or rebuild one) into a Hugging Face folder."""
    from raypo.search.export import export_model

    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    try:
        path = export_model(report, out, trial, rebuild=rebuild, merge=merge, log=log)
    except ValueError as e:  # a model that cannot load; raypo's own errors are ValueErrors
        _fail(str(e))
    typer.echo(str(path))


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
    the kernel-divergence pairs (each candidate kernel with each candidate divergence); no
    training."""
    from raypo.search.evidence import describe, metrics_config, selection_table
    from raypo.train.config import parse_overrides

    log = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    try:
        cfg = metrics_config(config, model=model, data=data,
                             overrides=dict(parse_overrides(set_)))
        table = selection_table(cfg, max_pairs=max_pairs, log=log)
    except ValueError as e:  # a model that cannot load; raypo's own errors are ValueErrors
        _fail(str(e))
    typer.echo(describe(table))
    if as_json:
        typer.echo(table.to_json(orient="records"))

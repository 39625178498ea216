"""Parameter importances of a report's finished trials: Optuna's PED-ANOVA on an in-memory
study rebuilt from the trials table (the page's "Parameter importances" section), or the
reason there are none.

Optuna is imported when importances are computed, never when raypo is."""

from __future__ import annotations

import math
import warnings

import pandas as pd

from raypo.reports.tables import Report


def missing(value) -> bool:
    """None, NaN or pandas' NA: a cell without a value."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _plain(value):
    """A cell as a plain Python value (numpy scalars unwrapped), missing as None."""
    if missing(value):
        return None
    return value.item() if hasattr(value, "item") else value


def distributions_of(frame: pd.DataFrame, columns: list[str]) -> dict:
    """An Optuna distribution per column, from the values observed: floats -> Float (log when
    all positive and spanning more than two decades), ints -> Int, anything else ->
    Categorical (missing strings are the choice None)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out = {}
    for column in columns:
        series = frame[column]
        present = series.dropna()
        if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
            choices = [_plain(v) for v in series.astype(object)]
            out[column] = CategoricalDistribution(list(dict.fromkeys(choices)))
        elif present.empty:
            continue
        elif pd.api.types.is_integer_dtype(series):
            out[column] = IntDistribution(int(present.min()), int(present.max()))
        else:
            lo, hi = float(present.min()), float(present.max())
            out[column] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 100)
    return out


def target_quantile(n: int) -> float:
    """PED-ANOVA's "good trials" share: Optuna's default 0.1 when there are 50 trials or more,
    else enough for five good trials (at most half). With the default 10% of a 16-trial
    search, PED-ANOVA compares one or two trials with the rest, and a noise parameter can
    come out first; five good trials rank the parameter that sets the objective first."""
    return min(0.5, max(0.1, 5 / max(n, 1)))


def min_trials_for_importances(searched: int) -> int:
    """The finished trials below which importances are not shown: max(8, 2 x the searched
    parameters). PED-ANOVA compares the best quantile with the rest; from two trials it
    gives 0.5 and 0.5 to two parameters whatever they do."""
    return max(8, 2 * searched)


def _trial(row: pd.Series, distributions: dict):
    """One finished trial as an Optuna FrozenTrial: its objective and its values of
    `distributions`' parameters (a conditional parameter it did not have left out)."""
    import optuna

    params, dists = {}, {}
    for column, dist in distributions.items():
        value = row[column]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[column] = _plain(value)
        elif missing(value):
            continue  # a conditional parameter this trial did not have
        else:
            is_int = isinstance(dist, optuna.distributions.IntDistribution)
            params[column] = int(value) if is_int else float(value)
        dists[column] = dist
    return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                     value=float(row["objective"]), params=params,
                                     distributions=dists)


def importances(report: Report) -> dict[str, float] | str:
    """Optuna's parameter importances on the finished trials, or the reason there are none.
    The evaluator is Optuna's default, PED-ANOVA, which (unlike fANOVA) also ranks conditional
    parameters (a `gamma` only some losses have), with its quantile sized to the search."""
    ok = report.finished()
    searched = report.hyperparameter_columns()
    need = min_trials_for_importances(len(searched))
    if len(ok) < need:
        return (f"Parameter importances need at least {need} finished trials (8, or two per "
                f"searched parameter: {len(searched)} here); this search has {len(ok)}. With "
                "fewer, one or two trials decide them, and the numbers would look like "
                "evidence that they are not.")
    columns = report.varied_parameters()
    if not columns:
        return "No hyperparameter varied across the finished trials: nothing to rank."
    import optuna

    distributions = distributions_of(ok, columns)
    trials = [_trial(row, distributions) for _, row in ok.iterrows()]
    direction = "minimize" if report.objective["mode"] == "min" else "maximize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction=direction)
        study.add_trials(trials)
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(
            target_quantile=target_quantile(len(trials)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError) as error:
        return f"Optuna could not compute importances: {error}"
    finally:
        optuna.logging.set_verbosity(verbosity)

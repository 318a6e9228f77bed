"""The few statistics the results and study tables print: mean ± sample std, Student's t
quantile for confidence half-widths, Pearson's correlation (scipy computes the last two)."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, statistics.stdev(values, m)


def t975(dof: int) -> float:
    """The 97.5 % quantile of Student's t with `dof` degrees of freedom (dof >= 1): the
    factor of a two-sided 95 % confidence half-width."""
    from scipy import stats  # imported here: scipy takes a second to import, few callers need it

    # rounded to 3 decimals as in a printed t table: the committed study tables were made with
    # those values, and the exact quantile would move a few half-widths by 0.01
    return round(float(stats.t.ppf(0.975, dof)), 3)


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's correlation coefficient (nan when either side is constant)."""
    from scipy import stats

    # scipy warns and returns nan on a constant input; the tables expect nan, quietly
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(stats.pearsonr(xs, ys).statistic)

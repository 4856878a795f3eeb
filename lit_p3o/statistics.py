"""Uncertainty for evaluation figures: percentile-bootstrap 95% intervals.

Every figure the reports print (a mean reward over held-out prompts, a win rate pooled over
seeds, a fitted gold reward at a given KL) is an estimate from a finite sample; these helpers
give it an interval so that two numbers can be compared. Resampling uses a seeded NumPy
generator, so an interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its ``level`` interval ``[low, high]``."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (the difference is significant at ``level``)."""
        return value < self.low or value > self.high


def _check(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")


def _interval(value: float, resampled: np.ndarray, level: float) -> Estimate:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high), level)


def bootstrap_mean(values: ArrayLike, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``values`` with the percentile-bootstrap interval: the ``(1−level)/2`` and
    ``(1+level)/2`` quantiles of the means of ``n_resamples`` resamples drawn with replacement."""
    return bootstrap(values, np.mean, n_resamples, level, seed)


def bootstrap(
    values: ArrayLike,
    statistic: Callable[[np.ndarray], float],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``statistic(values)`` with a percentile-bootstrap interval over the first axis of
    ``values`` (rows are resampled with replacement; a row may be a run's whole record)."""
    _check(n_resamples, level)
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 0 or len(data) == 0:
        raise ValueError("bootstrap: needs a non-empty sample")
    if not np.isfinite(data).all():
        raise ValueError("bootstrap: the sample holds a non-finite value")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(data), size=(n_resamples, len(data)))
    resampled = np.array([statistic(data[i]) for i in index])
    return _interval(statistic(data), resampled, level)


def pairwise_wins(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """``W[i, j, p] = 1`` when policy i of A beats policy j of B on prompt p, ½ on a tie, else 0.

    ``a`` is ``[runs_a, prompts]`` and ``b`` is ``[runs_b, prompts]``: judge scores of every
    run's response to the same prompts.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or 0 in a.shape + b.shape:
        raise ValueError(
            f"pairwise_wins: needs [runs, prompts] score arrays over the same prompts, got {a.shape} and {b.shape}"
        )
    left, right = a[:, None, :], b[None, :, :]
    return (left > right) + 0.5 * (left == right)


def pooled_win_rate(
    a: ArrayLike,
    b: ArrayLike,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    samples_per_prompt: int = 1,
) -> Estimate:
    """Win rate of method A over method B pooled over every pair of their runs and every prompt.

    The point estimate is the mean of :func:`pairwise_wins`. The interval is a bootstrap that
    resamples A's runs, B's runs and the prompts independently, so it reflects seed-to-seed
    variation as well as the finite prompt set (comparing a method with itself uses the same
    array twice: pass it as both ``a`` and ``b``; the diagonal then holds ½ ties).

    ``samples_per_prompt = R`` says the columns are R passes over the same P prompts (column
    ``r * P + p`` is pass r of prompt p): a prompt's R wins are averaged before the prompts are
    resampled, because samples of one prompt are not independent of each other.
    """
    _check(n_resamples, level)
    wins = pairwise_wins(a, b)
    n_a, n_b, columns = wins.shape
    if samples_per_prompt < 1 or columns % samples_per_prompt:
        raise ValueError(
            f"pooled_win_rate: {columns} scored columns are not {samples_per_prompt} passes over the same prompts"
        )
    wins = wins.reshape(n_a, n_b, samples_per_prompt, -1).mean(axis=2)
    n_p = wins.shape[2]
    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples)
    for r in range(n_resamples):
        ia, ib, ip = rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b), rng.integers(0, n_p, n_p)
        resampled[r] = wins[np.ix_(ia, ib, ip)].mean()
    return _interval(wins.mean(), resampled, level)


def fitted_value_at(
    runs: Sequence[tuple[ArrayLike, ArrayLike]],
    at: Sequence[float],
    degree: int = 1,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[Estimate]:
    """Least-squares polynomial of ``degree`` (a line by default) of ``y`` on ``x`` over all
    points of all ``runs`` (each a pair of arrays), read at each ``at``; intervals by
    resampling whole runs (a run's points are correlated, so runs, not points, are the
    independent units)."""
    _check(n_resamples, level)
    if degree < 1:
        raise ValueError(f"fitted_value_at: degree must be >= 1, got {degree}")
    if len(runs) < 1:
        raise ValueError("fitted_value_at: no runs")
    xs = [np.asarray(x, dtype=np.float64) for x, _ in runs]
    ys = [np.asarray(y, dtype=np.float64) for _, y in runs]
    if any(x.shape != y.shape or x.ndim != 1 for x, y in zip(xs, ys)):
        raise ValueError("fitted_value_at: each run needs two 1-d arrays of one length")
    at_arr = np.asarray(at, dtype=np.float64)

    def line(index: Sequence[int]) -> np.ndarray:
        x, y = np.concatenate([xs[i] for i in index]), np.concatenate([ys[i] for i in index])
        if len(np.unique(x)) <= degree:
            return np.full(len(at_arr), np.nan)  # too few distinct x values fix no curve
        return np.polyval(np.polyfit(x, y, degree), at_arr)

    point = line(range(len(runs)))
    rng = np.random.default_rng(seed)
    resampled = np.array([line(rng.integers(0, len(runs), len(runs))) for _ in range(n_resamples)])
    resampled = resampled[~np.isnan(resampled).any(axis=1)]
    if len(resampled) == 0 or np.isnan(point).any():
        raise ValueError(f"fitted_value_at: the runs' x values do not vary enough to fit degree {degree}")
    return [_interval(point[k], resampled[:, k], level) for k in range(len(at_arr))]

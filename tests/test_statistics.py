"""Bootstrap intervals and pooled win rates (lit_p3o/statistics.py), checked against direct
NumPy computations on small arrays."""

import numpy as np
import pytest

from lit_p3o.statistics import Estimate, bootstrap, bootstrap_mean, fitted_value_at, pairwise_wins, pooled_win_rate


def test_bootstrap_mean_matches_a_direct_resampling_loop():
    values = np.array([0.3, -1.2, 2.5, 0.0, 0.7, 1.1])
    got = bootstrap_mean(values, n_resamples=500, level=0.9, seed=3)
    rng = np.random.default_rng(3)
    index = rng.integers(0, 6, size=(500, 6))
    means = np.array([values[row].mean() for row in index])
    assert got.value == pytest.approx(values.mean())
    assert got.low == pytest.approx(np.percentile(means, 5))
    assert got.high == pytest.approx(np.percentile(means, 95))
    assert got.level == 0.9


def test_bootstrap_interval_of_a_constant_is_a_point_and_narrows_with_more_data():
    assert bootstrap_mean([2.0, 2.0, 2.0]) == Estimate(2.0, 2.0, 2.0)
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    width = lambda e: e.high - e.low  # noqa: E731
    assert width(bootstrap_mean(large)) < width(bootstrap_mean(small)) / 4
    e = bootstrap_mean(large)
    assert e.low < e.value < e.high and not e.excludes(0.0) and e.excludes(1.0)


def test_estimate_excludes_only_values_outside_its_closed_interval():
    e = Estimate(0.5, low=0.25, high=0.75)
    assert not e.excludes(0.25) and not e.excludes(0.75) and not e.excludes(0.5)  # the bounds are inside
    assert e.excludes(np.nextafter(0.25, 0.0)) and e.excludes(np.nextafter(0.75, 1.0))


def test_bootstrap_resamples_rows_of_a_two_dimensional_sample():
    runs = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    got = bootstrap(runs, lambda rows: rows[:, 1].mean() - rows[:, 0].mean(), n_resamples=50)
    assert (got.value, got.low, got.high) == pytest.approx((1.0, 1.0, 1.0))  # every resample of whole rows differs by 1


def test_bootstrap_rejects_bad_input():
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="bootstrap"):
            bootstrap_mean(bad)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean([1.0, 2.0], n_resamples=0)


def test_pairwise_wins_by_hand():
    a = [[1.0, 2.0, 3.0], [0.0, 5.0, 3.0]]  # two runs of A, three prompts
    b = [[1.0, 1.0, 4.0]]  # one run of B
    wins = pairwise_wins(a, b)
    assert wins.shape == (2, 1, 3)
    assert wins[:, 0].tolist() == [[0.5, 1.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="same prompts"):
        pairwise_wins(a, [[1.0, 2.0]])


def test_pooled_win_rate_pools_every_pair_of_runs_and_matches_a_direct_bootstrap():
    a = np.array([[1.0, 2.0, 3.0, 0.0], [0.0, 5.0, 3.0, 2.0]])
    b = np.array([[1.0, 1.0, 4.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 6.0, 3.0, 1.0]])
    got = pooled_win_rate(a, b, n_resamples=300, seed=5)
    by_hand = np.mean([[np.mean((x > y) + 0.5 * (x == y)) for y in b] for x in a])
    assert got.value == pytest.approx(by_hand)
    rng = np.random.default_rng(5)
    resampled = []
    for _ in range(300):
        ia, ib, ip = rng.integers(0, 2, 2), rng.integers(0, 3, 3), rng.integers(0, 4, 4)
        resampled.append(
            np.mean([[np.mean((a[i, ip] > b[j, ip]) + 0.5 * (a[i, ip] == b[j, ip])) for j in ib] for i in ia])
        )
    assert got.low == pytest.approx(np.percentile(resampled, 2.5))
    assert got.high == pytest.approx(np.percentile(resampled, 97.5))
    flipped = pooled_win_rate(b, a, n_resamples=10)
    assert flipped.value == pytest.approx(1 - got.value)


def test_pooled_win_rate_of_a_method_against_itself_is_one_half():
    a = np.random.default_rng(1).integers(0, 3, size=(3, 20)).astype(float)
    assert pooled_win_rate(a, a, n_resamples=10).value == pytest.approx(0.5)


def test_fitted_value_at_reads_the_pooled_line_and_resamples_runs():
    runs = [([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]), ([0.0, 2.0], [1.0, 3.0])]
    got = fitted_value_at(runs, at=[1.0, 4.0], n_resamples=200, seed=2)
    x = np.array([0.0, 1.0, 2.0, 0.0, 2.0])
    y = np.array([0.0, 1.0, 2.0, 1.0, 3.0])
    slope, intercept = np.polyfit(x, y, 1)
    assert [e.value for e in got] == pytest.approx([slope + intercept, 4 * slope + intercept])
    # resamples of whole runs give only three distinct lines: run 0 alone, run 1 alone, both
    lines = [(1.0, 0.0), (1.0, 1.0), (slope, intercept)]
    for estimate, at in zip(got, (1.0, 4.0)):
        values = [s * at + c for s, c in lines]
        assert min(values) - 1e-9 <= estimate.low <= estimate.high <= max(values) + 1e-9
    with pytest.raises(ValueError, match="do not vary"):
        fitted_value_at([([1.0, 1.0], [0.0, 2.0])], at=[1.0])


def test_fitted_value_at_fits_a_quadratic_exactly():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    runs = [(x, 1.0 + 2.0 * x - 0.5 * x**2), (x + 0.5, 1.0 + 2.0 * (x + 0.5) - 0.5 * (x + 0.5) ** 2)]
    (got,) = fitted_value_at(runs, at=[2.5], degree=2, n_resamples=20)
    truth = 1.0 + 2.0 * 2.5 - 0.5 * 2.5**2
    assert (got.value, got.low, got.high) == pytest.approx((truth, truth, truth))
    with pytest.raises(ValueError, match="degree 2"):
        fitted_value_at([([0.0, 1.0], [0.0, 1.0])], at=[1.0], degree=2)


def test_pooled_win_rate_resamples_prompts_not_the_samples_of_one_prompt():
    # two passes over three prompts: column r * 3 + p is pass r of prompt p
    a = np.array([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0]])
    b = np.array([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    per_prompt = np.array([0.5, 0.25, 1.0])  # mean over the two passes of 1 / ½ / 0 wins
    rng = np.random.default_rng(3)
    resampled = []
    for _ in range(200):
        rng.integers(0, 1, 1), rng.integers(0, 1, 1)  # the one run of each method
        resampled.append(per_prompt[rng.integers(0, 3, 3)].mean())
    got = pooled_win_rate(a, b, n_resamples=200, seed=3, samples_per_prompt=2)
    assert got.value == pytest.approx(per_prompt.mean())
    assert got.low == pytest.approx(np.percentile(resampled, 2.5))
    assert got.high == pytest.approx(np.percentile(resampled, 97.5))
    # read as six independent prompts, the same scores give a narrower interval
    naive = pooled_win_rate(a, b, n_resamples=200, seed=3)
    assert naive.value == pytest.approx(got.value)
    assert naive.high - naive.low < got.high - got.low
    for passes in (4, 0):
        with pytest.raises(ValueError, match=f"not {passes} passes"):
            pooled_win_rate(a, b, samples_per_prompt=passes)

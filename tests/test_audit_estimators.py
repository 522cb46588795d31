"""The one-run estimators against jax_privacy's published vectors, and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special

from dpfeta.privacy import audit


def _quantiles(mu: float, n: int) -> np.ndarray:
    """Deterministic N(mu, 1) scores: Phi^-1((i + 1/2) / n) + mu (jax_privacy's test construction)."""
    return scipy.special.ndtri((np.arange(n) + 0.5) / n) + mu


# jax_privacy tests/auditing_test.py::test_epsilon_one_run_close: n = 10,000 in and out, 95 %, delta = 1e-6.
PUBLISHED = [
    (1, "one_run", 1.13346),
    (1, "fdp", 2.164749),
    (2, "one_run", 2.311945),
    (2, "fdp", 4.7218075),
    (4, "one_run", 4.395568),
    (4, "fdp", 9.133752),
]


@pytest.mark.parametrize("shift,estimator,expected", PUBLISHED)
def test_published_vectors(shift, estimator, expected):
    n = 10_000
    fn = audit.epsilon_one_run if estimator == "one_run" else audit.epsilon_one_run_fdp
    bound = fn(_quantiles(shift, n), _quantiles(0, n), significance=0.05, delta=1e-6)
    assert bound.epsilon == pytest.approx(expected, rel=1e-3)
    assert bound.canaries == 2 * n and 0 < bound.correct <= bound.guesses <= 2 * n


def test_no_signal_gives_zero():
    scores = _quantiles(0, 1000)
    for fn in (audit.epsilon_one_run, audit.epsilon_one_run_fdp):
        bound = fn(scores, scores, delta=1e-5)
        assert bound.epsilon == 0.0 and bound.guesses == 0


def test_more_separation_larger_bound():
    for fn in (audit.epsilon_one_run, audit.epsilon_one_run_fdp):
        bounds = [fn(_quantiles(mu, 500), _quantiles(0, 500), delta=1e-5).epsilon for mu in (0.5, 1, 2, 4)]
        assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds


def test_bound_sits_on_the_rejection_boundary_of_its_counts():
    """The one-run bound is what its (m, r, v) support at the corrected level, and not more."""
    rng = np.random.default_rng(0)
    ins, outs = rng.normal(2, 1, 400), rng.normal(0, 1, 400)
    b = audit.epsilon_one_run(ins, outs, significance=0.05, delta=1e-5)
    level = 0.05 / b.candidates
    p_at = audit.one_run_p_value(canaries=800, guesses=b.guesses, correct=b.correct, epsilon=b.epsilon, delta=1e-5)
    p_above = audit.one_run_p_value(
        canaries=800, guesses=b.guesses, correct=b.correct, epsilon=b.epsilon * 1.01, delta=1e-5
    )
    assert p_at <= level < p_above
    # Perfect separation cannot beat the delta = 0 cap logit(significance^(1/r)) of r = 400 right guesses.
    perfect = audit.epsilon_one_run(np.arange(400) + 1000.0, np.arange(400), significance=0.05, delta=1e-5)
    assert 0 < perfect.epsilon < math.log(0.05 ** (1 / 400) / (1 - 0.05 ** (1 / 400)))
    assert perfect.guesses == perfect.correct


def test_bounds_hold_for_a_gaussian_mechanism():
    """Random scores of a mu-GDP mechanism: the 95 % bounds stay below its true epsilon."""
    mu, delta = 1.0, 1e-5
    true_eps = scipy.optimize.brentq(lambda e: audit.gaussian_delta(mu, e) - delta, 0, 50)
    rng = np.random.default_rng(1)
    for _ in range(5):
        ins, outs = rng.normal(mu, 1, 1000), rng.normal(0, 1, 1000)
        assert audit.epsilon_one_run(ins, outs, delta=delta).epsilon < true_eps
        assert audit.epsilon_one_run_fdp(ins, outs, delta=delta).epsilon < true_eps


def test_gaussian_mu_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    for eps, delta in ((1.0, 1e-5), (4.0, 1e-6), (10.0, 1e-5)):
        mu = audit.gaussian_mu(eps, delta)
        assert audit.gaussian_delta(mu, eps) == pytest.approx(delta, rel=1e-6)
        assert 1 / mu == pytest.approx(dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-4)


def test_guess_sets_follow_the_roc_hull():
    # ins 0.5 1.5 2.5 3.5, outs 0 1 2 3: hull vertices guess none, the top in, all.
    r, v = audit.guess_sets([1.5, 2.5, 0.5, 3.5], [0, 3, 2, 1])
    assert r.tolist() == [0, 1, 7, 8] and v.tolist() == [0, 1, 4, 4]


def test_ideal_bounds_match_the_reference_table():
    """auditing.md §4: mu = 2, 500 / 500 canaries, delta = 1e-5 -> 2.18 (one run) and 3.25 (f-DP)."""
    got = audit.ideal_bounds(2.0, canaries=1000, delta=1e-5)
    assert got["one_run"] == pytest.approx(2.18, abs=0.01) and got["fdp"] == pytest.approx(3.25, abs=0.01)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_scores=[], out_scores=[1.0]), "both included and excluded"),
        (dict(in_scores=[float("nan")], out_scores=[1.0]), "finite"),
        (dict(in_scores=[1.0], out_scores=[0.0], significance=0.7), "significance"),
        (dict(in_scores=[1.0], out_scores=[0.0], delta=0.0), "delta"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    kwargs.setdefault("delta", 1e-5)
    with pytest.raises(ValueError, match=match):
        audit.epsilon_one_run(**kwargs)

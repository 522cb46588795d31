"""Empirical privacy lower bounds from one training run with canaries (numpy/scipy only).

m canaries are each included in the training data independently with probability 1/2; after one run
the auditor scores every canary (higher = "looks included") and guesses "in" for the r canaries with
the top scores, abstaining on the rest. Two tests turn (m, r, correct guesses) into a lower bound on
epsilon, holding with probability >= 1 - significance when the claim (epsilon, delta) is false:

* ``epsilon_one_run`` -- Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023 (arXiv 2305.08846), Theorem 3.1 / Proposition 5.2 with k_- = 0: under (eps, delta)-DP the
  number of correct guesses is dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term.
* ``epsilon_one_run_fdp`` -- Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One
  Run", ICML 2025 (arXiv 2410.22235), their recursive bound on correct guesses under a hypothesised
  trade-off curve, here the Gaussian curve G_mu of the Gaussian mechanism that is exactly
  (eps, delta)-DP; the estimate is the largest eps whose curve the counts reject.

Abstention: r is searched over the vertices of the ROC convex hull (every other threshold is
dominated), with a Bonferroni correction over the number of vertices searched. This follows
jax_privacy's ``CanaryScoreAuditor`` (Bonferroni threshold strategy), whose published test vectors
``tests/test_audit_estimators.py`` reproduces; the code here is written independently.

Nothing here knows about DP-SGD: scores in, bounds out. ``ideal_bounds`` gives what a perfect
auditor would see from a mu-GDP mechanism (docs: shared/reference/auditing.md §4), to print next to a
measured bound so that "0.1 at eps = 1" reads as healthy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

ESTIMATORS = ("one_run", "fdp")


@dataclass(frozen=True)
class Bound:
    """One estimator's lower bound and the guess set that gave it."""

    estimator: str  # "one_run" (Steinke et al.) or "fdp" (Mahloujifar et al.)
    epsilon: float  # the lower bound (0 when nothing is rejected)
    guesses: int  # r: canaries guessed "in" (the top-r scores); 0 when no bound
    correct: int  # of those, truly included
    canaries: int  # m
    candidates: int  # guess-set sizes searched (the Bonferroni factor)
    significance: float  # 1 - confidence
    delta: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------
# Candidate guess sets: the vertices of the ROC convex hull
# --------------------------------------------------------------------------------------------


def _check_scores(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
    ins, outs = np.asarray(in_scores, np.float64).ravel(), np.asarray(out_scores, np.float64).ravel()
    if ins.size == 0 or outs.size == 0:
        raise ValueError(f"expected scores of both included and excluded canaries, got {ins.size} and {outs.size}")
    if not (np.isfinite(ins).all() and np.isfinite(outs).all()):
        raise ValueError("expected finite canary scores, got NaN or inf")
    return ins, outs


def guess_sets(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
    """(r, correct) for every threshold on the upper convex hull of the ROC curve, r ascending.

    A threshold t guesses "in" for every score >= t; thresholds are the distinct scores and +inf.
    Points (false negatives, true negatives) are taken over increasing t; a point below (or on) the
    chord of two others is dominated by randomising between them and is dropped.
    """
    ins, outs = _check_scores(in_scores, out_scores)
    thresholds = np.append(np.union1d(ins, outs), np.inf)
    fn = np.searchsorted(np.sort(ins), thresholds, side="left")
    tn = np.searchsorted(np.sort(outs), thresholds, side="left")
    hull: list[int] = []
    for j in range(len(thresholds)):  # monotone chain: keep clockwise turns only
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            turn = (fn[b] - fn[a]) * (tn[j] - tn[a]) - (tn[b] - tn[a]) * (fn[j] - fn[a])
            if turn < 0:
                break
            hull.pop()
        hull.append(j)
    keep = np.array(hull[::-1])  # descending thresholds = ascending guess counts
    correct = len(ins) - fn[keep]
    return correct + len(outs) - tn[keep], correct


# --------------------------------------------------------------------------------------------
# Steinke, Nasr & Jagielski (2023)
# --------------------------------------------------------------------------------------------


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P-value of observing ``correct`` of ``guesses`` right under an (epsilon, delta)-DP claim.

    Binomial tail beta = P[Bin(r, p) >= v], p = e^eps / (1 + e^eps), plus the delta term of
    Steinke et al. (Theorem 5.2): 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i.
    """
    p = scipy.special.expit(epsilon)
    tail = scipy.stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(tail)
    i = np.arange(1, correct + 1)
    window = scipy.stats.binom.sf(correct - 1 - i, guesses, p) - tail
    return float(min(1.0, tail + 2 * canaries * delta * np.max(window / i)))


def _largest_rejected(rejects, epsilon_floor: float) -> float:
    """The largest eps > epsilon_floor with rejects(eps) (decreasing in eps), or epsilon_floor."""
    if not rejects(epsilon_floor):
        return epsilon_floor
    hi = max(1.0, 2 * epsilon_floor)
    lo = epsilon_floor
    while rejects(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # perfect guesses with delta = 0 have no finite bound
            return math.inf
    return _bisect(rejects, lo, hi)


def _bisect(rejects, lo: float, hi: float, xtol: float = 1e-7) -> float:
    """rejects(lo) and not rejects(hi): shrink to the boundary."""
    while hi - lo > xtol * max(1.0, lo):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# Mahloujifar, Melis & Chaudhuri (2025), Gaussian trade-off curve
# --------------------------------------------------------------------------------------------


def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su, Corollary 2.13): Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    a = scipy.special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + scipy.special.log_ndtr(-epsilon / mu - mu / 2)
    return float(np.exp(a) * -np.expm1(b - a)) if b < a else 0.0


@functools.lru_cache(maxsize=4096)
def gaussian_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian mechanism that is exactly (epsilon, delta)-DP (delta(eps) grows with mu)."""
    if not 0 < delta < 1:
        raise ValueError(f"expected delta in (0, 1), got {delta}")
    lo, hi = 1e-6, 1.0
    if gaussian_delta(lo, epsilon) >= delta:
        return 0.0
    while gaussian_delta(hi, epsilon) < delta:
        hi *= 2
    return scipy.optimize.brentq(lambda mu: gaussian_delta(mu, epsilon) - delta, lo, hi, xtol=1e-12, rtol=1e-12)


def fdp_rejects(*, canaries: int, guesses: int, correct: int, mu: float, significance: float) -> bool:
    """Do the counts reject mu-GDP at level ``significance``? (Mahloujifar et al., Algorithm 3 with cap.)

    Walk down the number of correct guesses from v: r and h bound the (scaled) probability mass of
    "correct" and "wrong" outcomes the curve G_mu allows; the claim is rejected when the mass
    needed for r guesses, r / m, exceeds what the curve can supply.
    """
    right = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        need = scipy.special.ndtr(scipy.special.ndtri(right) - mu) if right < 1 else 1.0
        if need <= wrong:
            break
        right = min(1.0, right + i / (guesses - i) * (need - wrong))
        wrong = need
    return right + wrong > guesses / canaries


# --------------------------------------------------------------------------------------------
# The estimators, with abstention
# --------------------------------------------------------------------------------------------


def _check_level(significance: float, delta: float) -> None:
    if not 0 < significance < 0.5:
        raise ValueError(f"expected significance (1 - confidence) in (0, 0.5), got {significance}")
    if not 0 < delta < 1:
        raise ValueError(f"expected delta in (0, 1), got {delta}")


def _search(estimator: str, in_scores, out_scores, significance: float, delta: float) -> Bound:
    _check_level(significance, delta)
    guesses, correct = guess_sets(in_scores, out_scores)
    m = int(np.size(in_scores) + np.size(out_scores))
    level = significance / len(guesses)  # Bonferroni over the guess sets searched
    best = Bound(estimator, 0.0, 0, 0, m, len(guesses), significance, delta)
    # Most precise sets first: later ones are usually ruled out by the precision check alone.
    for j in np.argsort(-(correct + 0.5) / (guesses + 1.0), kind="stable"):
        r, v = int(guesses[j]), int(correct[j])
        if r == 0 or v / r <= scipy.special.expit(best.epsilon):
            continue  # the binomial tail at this precision is >= 1/2: nothing to reject
        if estimator == "one_run":
            if one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=best.epsilon, delta=0) > level:
                continue

            def rejects(eps: float) -> bool:
                return one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) <= level
        else:

            def rejects(eps: float) -> bool:
                return fdp_rejects(canaries=m, guesses=r, correct=v, mu=gaussian_mu(eps, delta), significance=level)

        eps = _largest_rejected(rejects, best.epsilon)
        if eps > best.epsilon:
            best = Bound(estimator, float(eps), r, v, m, len(guesses), significance, delta)
    return best


def epsilon_one_run(in_scores, out_scores, *, significance: float = 0.05, delta: float) -> Bound:
    """Steinke et al.'s one-run lower bound on epsilon at confidence 1 - significance.

    ``in_scores``/``out_scores``: scores of included / excluded canaries, higher meaning "included".
    """
    return _search("one_run", in_scores, out_scores, significance, delta)


def epsilon_one_run_fdp(in_scores, out_scores, *, significance: float = 0.05, delta: float) -> Bound:
    """Mahloujifar et al.'s one-run f-DP lower bound (Gaussian curves) on epsilon at 1 - significance."""
    return _search("fdp", in_scores, out_scores, significance, delta)


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve of the score (ties count 1/2); 0.5 = no signal."""
    ins, outs = _check_scores(in_scores, out_scores)
    ranks = scipy.stats.rankdata(np.concatenate([ins, outs]))
    return float((ranks[: ins.size].sum() - ins.size * (ins.size + 1) / 2) / (ins.size * outs.size))


def ideal_scores(mu: float, included: int, excluded: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic quantiles of N(mu, 1) and N(0, 1): the best scores a mu-GDP mechanism can give."""

    def quantiles(n: int) -> np.ndarray:
        return scipy.special.ndtri((np.arange(n) + 0.5) / n)

    return quantiles(included) + mu, quantiles(excluded)


def ideal_bounds(mu: float, *, canaries: int, significance: float = 0.05, delta: float) -> dict[str, float]:
    """Both estimators on ``ideal_scores`` with m/2 in and m/2 out: what a perfect audit of a mu-GDP
    mechanism returns (auditing.md §4); a correct build should land near (mostly below) these."""
    half = max(1, canaries // 2)
    ins, outs = ideal_scores(mu, half, canaries - half)
    return {
        "one_run": epsilon_one_run(ins, outs, significance=significance, delta=delta).epsilon,
        "fdp": epsilon_one_run_fdp(ins, outs, significance=significance, delta=delta).epsilon,
    }

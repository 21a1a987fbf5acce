"""Distribution-free paired statistics for the claims about trained models (exact, no normality assumed).

A claim is checked on per-fact *paired* differences (knowledge neurons minus random neurons on the same fact,
fact minus its controls), so that what varies from fact to fact cancels, and it is asserted through a one-sided
confidence bound rather than a threshold next to one measured value.
"""

from __future__ import annotations

from math import comb

ALPHA = 0.01  # one-sided error of every bound and test below


def binom_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(B <= k) for B ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(min(k, n) + 1))


def median_lower_bound(diffs, alpha: float = ALPHA) -> float:
    """A (1 - alpha) lower confidence bound for the median of ``diffs`` (sign-test inversion): the k-th smallest
    value, k the largest with P(Binomial(n, 1/2) <= k - 1) <= alpha. ``-inf`` when n is too small for any bound.
    If the true median were at or below this value, seeing so many values above it would have probability
    <= alpha."""
    xs = sorted(diffs)
    k = 0
    while k < len(xs) and binom_cdf(k, len(xs)) <= alpha:  # P(B <= k) <= alpha  ->  the (k+1)-th value is a bound
        k += 1
    return xs[k - 1] if k else float("-inf")


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test (McNemar's test for paired binary outcomes): the probability of at least ``wins``
    wins among ``wins + losses`` discordant pairs if wins and losses were equally likely. Ties are left out."""
    n = wins + losses
    return 1.0 - binom_cdf(wins - 1, n) if n else 1.0


def proportion_lower_bound(successes: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a success probability (found by bisection)."""
    if successes == 0:
        return 0.0
    lo, hi = 0.0, successes / n
    for _ in range(60):
        mid = (lo + hi) / 2
        if 1.0 - binom_cdf(successes - 1, n, mid) <= alpha:  # P(X >= successes | p = mid) still too small
            lo = mid
        else:
            hi = mid
    return lo


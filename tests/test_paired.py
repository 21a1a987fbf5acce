"""The paired statistics that the claims about trained models rest on (tests/paired.py) do what they say."""

from __future__ import annotations

import math
import random

from paired import binom_cdf, median_lower_bound, proportion_lower_bound, sign_test_p


def test_binomial_cdf_against_the_definition():
    assert math.isclose(binom_cdf(2, 15), (1 + 15 + 105) / 2 ** 15)
    assert binom_cdf(-1, 5) == 0.0 and math.isclose(binom_cdf(5, 5), 1.0)
    assert math.isclose(binom_cdf(0, 4, 0.25), 0.75 ** 4)


def test_median_lower_bound_is_an_order_statistic_with_the_stated_error():
    xs = list(range(1, 16))  # n = 15: P(B <= 2) = 0.0037 <= 0.01 < P(B <= 3) = 0.0176 -> the 3rd smallest
    assert median_lower_bound(xs, 0.01) == 3
    assert median_lower_bound([5.0] * 6, 0.01) == float("-inf")  # 6 values cannot give a 99 % bound (2^-6 > 0.01)
    assert median_lower_bound(list(range(7)), 0.01) == 0  # 2^-7 < 0.01: the smallest value


def test_median_lower_bound_covers_the_true_median():
    rng = random.Random(0)
    for alpha in (0.01, 0.05):
        misses = sum(median_lower_bound([rng.gauss(0, 1) + rng.choice((-3, 0, 3)) for _ in range(40)], alpha) > 0
                     for _ in range(2000))
        assert misses / 2000 <= alpha + 0.01  # the bound exceeds the true median (0) at most alpha of the time
    shifted = [median_lower_bound([rng.gauss(1, 1) for _ in range(40)]) > 0 for _ in range(200)]
    assert sum(shifted) >= 190  # and it finds a real shift of one standard deviation


def test_sign_test_and_proportion_bound():
    assert math.isclose(sign_test_p(10, 0), 2 ** -10)
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) > 0.5
    assert math.isclose(proportion_lower_bound(20, 20, 0.01), 0.01 ** (1 / 20), rel_tol=1e-9)
    lb = proportion_lower_bound(30, 50, 0.01)
    assert 0.4 < lb < 0.6 and math.isclose(1 - binom_cdf(29, 50, lb), 0.01, rel_tol=1e-6)
    assert proportion_lower_bound(0, 10) == 0.0


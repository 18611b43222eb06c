"""Standard errors every suite shares, with exact values."""

from __future__ import annotations

import pytest

from sft_engine.evaluation.suite import binomial_stderr, mean_stderr, paired_delta_stderr, ratio_stderr


def test_paired_stderr_is_the_ratio_estimator_of_per_item_differences() -> None:
    counts = [10.0, 20.0, 30.0]
    base, tuned = [20.0, 30.0, 90.0], [10.0, 28.0, 60.0]
    # Differences -10, -2, -30 over 60 tokens: delta -0.7; residuals d - delta*c = -3, 12, -9;
    # sqrt((9 + 144 + 81) / 2) / (20 * sqrt(3)) = sqrt(117) / 34.641
    assert paired_delta_stderr((tuned, counts), (base, counts)) == pytest.approx(117 ** 0.5 / (20 * 3 ** 0.5))
    # Scored on different samples: no paired figure.
    assert paired_delta_stderr((tuned, counts), (base, [10.0, 20.0, 31.0])) is None
    # 0/1 outcomes on the same 4 items: differences 1, 0, 0, 1 -> mean 0.5, sd 0.577, stderr 0.289.
    assert paired_delta_stderr(([1, 1, 0, 1], [1.0] * 4), ([0, 1, 0, 0], [1.0] * 4)) == pytest.approx(0.5773503 / 2)


def test_mean_stderr_of_zero_one_outcomes_is_the_binomial_one() -> None:
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == (0.5, pytest.approx(binomial_stderr(0.5, 4)))
    assert mean_stderr([0.5, 1.0, 0.0]) == (0.5, pytest.approx(0.5 / 3 ** 0.5 * 1.0))
    assert ratio_stderr([2.0], [1.0]) != ratio_stderr([2.0], [1.0])  # nan: one item has no spread to estimate

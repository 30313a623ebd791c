"""CPR and CMD (the MIB circuit track's summaries of a faithfulness curve) on hand-made curves."""

import numpy as np
import pytest

from rl_circuits.analysis.faithfulness import MIB_FRACTIONS, cmd, cpr, mib_edge_counts


def test_mib_grid_is_mibs():
    assert MIB_FRACTIONS == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    # int(fraction * n), rounded down: 1.234 -> 1, 2.468 -> 2, 6.17 -> 6, ...
    assert mib_edge_counts(1234) == [1, 2, 6, 12, 24, 61, 123, 246, 617, 1234]


def test_constant_curves_on_the_mib_grid():
    ones = np.ones(len(MIB_FRACTIONS))
    # The grid spans 1 - 0.001 of the axis.
    assert cpr(MIB_FRACTIONS, ones) == pytest.approx(0.999, abs=1e-12)
    assert cmd(MIB_FRACTIONS, ones) == pytest.approx(0.0, abs=1e-12)
    assert cpr(MIB_FRACTIONS, 0 * ones) == pytest.approx(0.0, abs=1e-12)
    assert cmd(MIB_FRACTIONS, 0 * ones) == pytest.approx(0.999, abs=1e-12)


def test_linear_curve_is_integrated_exactly():
    # f(x) = x: CPR = (1 - 0.001^2) / 2, CMD = integral of 1 - x over [0.001, 1].
    f = np.asarray(MIB_FRACTIONS)
    assert cpr(MIB_FRACTIONS, f) == pytest.approx(0.4999995, abs=1e-12)
    assert cmd(MIB_FRACTIONS, f) == pytest.approx(0.4990005, abs=1e-12)


def test_hand_computed_trapezoids():
    x = [0.0, 0.5, 1.0]
    # CPR: 0.5 * (0 + 1) / 2 + 0.5 * (1 + 0.5) / 2; CMD: |1 - f| = (1, 0, 0.5).
    assert cpr(x, [0.0, 1.0, 0.5]) == pytest.approx(0.625, abs=1e-12)
    assert cmd(x, [0.0, 1.0, 0.5]) == pytest.approx(0.375, abs=1e-12)
    # Above 1 a curve adds to CPR and to CMD alike (|1 - f|, not 1 - f).
    assert cpr([0.0, 1.0], [1.5, 1.5]) == pytest.approx(1.5, abs=1e-12)
    assert cmd([0.0, 1.0], [1.5, 1.5]) == pytest.approx(0.5, abs=1e-12)
    # A curve crossing 1 between grid points: the trapezoid of |1 - f| at the points, as MIB.
    assert cmd([0.0, 1.0], [0.0, 2.0]) == pytest.approx(1.0, abs=1e-12)


def test_leading_axes_are_kept():
    curves = np.array([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(cpr([0.0, 0.5, 1.0], curves), [0.625, 1.0], atol=1e-12)
    np.testing.assert_allclose(cmd([0.0, 0.5, 1.0], curves), [0.375, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    "x, f, match",
    [([0.0, 1.0], [1.0, 1.0, 1.0], "must match"), ([0.5, 0.1], [1.0, 1.0], "must increase")],
)
def test_bad_curves_are_refused(x, f, match):
    with pytest.raises(ValueError, match=match):
        cpr(x, f)

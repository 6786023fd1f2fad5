import math

import numpy as np
import pytest

from quark.stats import paired_bootstrap, sign_test, wilson


def test_wilson_known_values_and_edges():
    assert wilson(0, 10) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.2775, abs=1e-4))   # Agresti & Coull 1998
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    assert wilson(50, 100, 0.99)[1] - wilson(50, 100, 0.99)[0] > wilson(50, 100)[1] - wilson(50, 100)[0]
    with pytest.raises(ValueError, match="k <= n"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 2, 1.5)


def test_wilson_covers_the_true_rate():
    rng = np.random.default_rng(0)
    p, n = 0.1, 40
    hits = sum(lo <= p <= hi for lo, hi in (wilson(int(k), n) for k in rng.binomial(n, p, size=2000)))
    assert 0.93 <= hits / 2000 <= 0.98


def test_sign_test_exact():
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(0, 6) == pytest.approx(2 / 64)
    assert sign_test(20, 0) < 1e-5


def test_paired_bootstrap_interval():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 10)
    diff, lo, hi = paired_bootstrap(a, a)
    assert diff == lo == hi == 0.0                   # identical items: no difference at all
    b = a.copy()
    b[:20] = 0                                       # b loses 20 items' worth of 1s
    diff, lo, hi = paired_bootstrap(a, b)
    assert diff == pytest.approx(-(a[:20].sum()) / len(a)) and lo <= diff <= hi < 0
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1, 0], [1])
    assert math.isfinite(paired_bootstrap([0.5], [0.25])[0])

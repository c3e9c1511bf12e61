"""The buy-till-you-die formulas (projections/clv.py): hand-computed values, the special case that
reduces to the unconditional MBG/NBD expectation, and parameter recovery from simulated customers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import hyp2f1

from projections import clv


def test_probability_alive_by_hand():
    params = clv.Params(r=1.0, alpha=1.0, a=1.0, b=1.0, fitted=True)
    # 1 / (1 + a/(b+x) * ((alpha+T)/(alpha+tx))^(r+x)) = 1 / (1 + 1/2 * (4/2)^2) = 1/3
    assert clv.probability_alive(params, np.array([1.0]), np.array([1.0]), np.array([3.0]))[0] == pytest.approx(1 / 3)
    # no purchase after the first, observed at once: b / (a + b)
    assert clv.probability_alive(params, np.array([0.0]), np.array([0.0]), np.array([0.0]))[0] == pytest.approx(0.5)


def test_expected_purchases_of_a_brand_new_customer_is_the_population_expectation():
    params = clv.Params(r=0.8, alpha=20.0, a=2.5, b=6.0, fitted=True)
    r, alpha, a, b, t = params.r, params.alpha, params.a, params.b, 365.0
    population = b / (a - 1) * (1 - hyp2f1(r, b + 1, a + b, t / (alpha + t)) * (alpha / (alpha + t)) ** r)
    zero = np.array([0.0])
    assert clv.expected_purchases(params, t, zero, zero, zero)[0] == pytest.approx(population)


def test_gamma_gamma_spend_by_hand():
    # CDNOW parameters of Fader, Hardie & Lee (2005): p=6.25, q=3.74, v=15.44
    params = clv.Params(p=6.25, q=3.74, v=15.44, fitted=True)
    # p (v + x m) / (p x + q - 1) = 6.25 * (15.44 + 20) / (6.25 + 2.74)
    got = clv.expected_spend(params, np.array([1.0, 0.0]), np.array([20.0, 0.0]))
    assert got[0] == pytest.approx(6.25 * 35.44 / 8.99)
    assert got[1] == pytest.approx(6.25 * 15.44 / 2.74)     # x = 0: the population mean p v / (q - 1)


def _simulate(rng: np.random.Generator, n: int, r: float, alpha: float, a: float, b: float, horizon: float):
    """MBG/NBD customers observed for `horizon` days after their first purchase."""
    lam = rng.gamma(r, 1 / alpha, n)
    p = rng.beta(a, b, n)
    x = np.zeros(n)
    tx = np.zeros(n)
    for i in range(n):
        t = 0.0
        if rng.random() < p[i]:        # MBG: may drop out right after the first purchase
            continue
        while True:
            t += rng.exponential(1 / lam[i])
            if t > horizon:
                break
            x[i] += 1
            tx[i] = t
            if rng.random() < p[i]:
                break
    return x, tx, np.full(n, horizon)


def test_fit_recovers_simulated_parameters():
    rng = np.random.default_rng(3)
    x, tx, T = _simulate(rng, 6000, r=0.5, alpha=20.0, a=1.5, b=6.0, horizon=365.0)
    spend = rng.gamma(4.0, 10.0, len(x))
    params = clv.fit(x, tx, T, spend)
    assert params.fitted
    # the mean purchase rate r / alpha and the mean dropout probability a / (a + b) are identified well
    assert params.r / params.alpha == pytest.approx(0.5 / 20.0, rel=0.15)
    assert params.a / (params.a + params.b) == pytest.approx(1.5 / 7.5, rel=0.25)
    alive, value = clv.predict(params, x, tx, T, spend)
    assert ((alive >= 0) & (alive <= 1)).all() and (value >= 0).all()


def test_fit_is_deterministic():
    rng = np.random.default_rng(5)
    x, tx, T = _simulate(rng, 800, r=0.7, alpha=10.0, a=1.0, b=3.0, horizon=200.0)
    spend = rng.gamma(3.0, 20.0, len(x))
    assert clv.fit(x, tx, T, spend) == clv.fit(x.copy(), tx.copy(), T.copy(), spend.copy())

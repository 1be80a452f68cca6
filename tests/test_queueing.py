"""The SimPy model against queueing theory, Little's law and seeded reproducibility.

A single :class:`~evsim.model.station.SimStation` with ``c`` identical connectors, Poisson
arrivals and exponential sessions is an M/M/c FCFS queue, so the mean wait measured through the
whole pipeline (station -> trace -> :func:`~evsim.metrics.compute_metrics`) must agree with the
Erlang-C formula ``W_q = C(c, a) / (c mu - lambda)``, and the fraction of sessions that waited
with ``C(c, a)`` itself.

Tolerances come from the run length. The sample mean of M/M/c waits is strongly
autocorrelated, so its spread is much wider than ``sd(W) / sqrt(n)``; ``_SD_30K`` holds the
relative standard deviation of the two estimators at 30,000 customers (2 % warm-up dropped),
measured over 150 independent replications of the exact FCFS recursion (Kiefer-Wolfowitz,
heap of connector free times). It scales as ``1 / sqrt(n)``; each case must land within four
standard deviations (and never needs more than the floor when the run is long enough), and the
average error over all nine independent cases within four standard deviations of *that* mean,
which is a much tighter check (about 6 %) against a systematic bias.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import simpy

from evsim.metrics import compute_metrics, little_law, sessions_table
from evsim.model import Simulation
from evsim.model.station import SessionPlan, SimStation
from evsim.model.world import ConnectorSpec
from evsim.scenario import DATA_DIR, load_scenario
from evsim.trace import Kind, TraceWriter

# --------------------------------------------------------------------------------------------
# Erlang C
# --------------------------------------------------------------------------------------------


def erlang_b(c: int, a: float) -> float:
    """Erlang B blocking probability by the stable recursion B(k) = a B(k-1) / (k + a B(k-1))."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in M/M/c with offered load ``a = lambda / mu``
    (requires ``a < c``), from Erlang B: C = B / (1 - rho (1 - B)). No factorials or powers,
    so it is stable for thousands of servers."""
    if not 0 <= a < c:
        raise ValueError(f"need 0 <= a < c, got a={a}, c={c}")
    b = erlang_b(c, a)
    rho = a / c
    return b / (1.0 - rho * (1.0 - b))


def erlang_c_exact(c: int, a: int) -> Fraction:
    """The textbook formula ``(a^c / c!) c/(c-a) / (sum_{k<c} a^k/k! + (a^c / c!) c/(c-a))``
    in exact integer arithmetic (integer load, everything multiplied by ``c! (c - a)``)."""
    terms = sum(a**k * (math.factorial(c) // math.factorial(k)) for k in range(c))
    top = a**c * c
    return Fraction(top, (c - a) * terms + top)


def mmc_wait(c: int, lam: float, mu: float) -> float:
    """Mean wait in queue W_q of M/M/c."""
    return erlang_c(c, lam / mu) / (c * mu - lam)


def test_erlang_c_textbook_values() -> None:
    # M/M/1: C = rho
    assert erlang_c(1, 0.7) == pytest.approx(0.7, rel=1e-12)
    # two servers: C(2, a) = a^2 / (2 + a), so 1/3 at one Erlang
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3, rel=1e-12)
    # the classic call-centre table value: 10 agents, 8 Erlangs -> P(wait) = 0.4092
    # (Erlang B(10, 8) = 0.12166)
    assert erlang_b(10, 8.0) == pytest.approx(0.12166, abs=5e-6)
    assert erlang_c(10, 8.0) == pytest.approx(0.4092, abs=1e-4)
    # M/M/2 with lambda = 1.5, mu = 1: W_q = 9/7 (rho = 0.75, P0 = 1/7)
    assert mmc_wait(2, 1.5, 1.0) == pytest.approx(9 / 7, rel=1e-12)


@pytest.mark.parametrize(
    ("c", "a"), [(1, 0), (3, 2), (4, 3), (20, 15), (120, 100), (300, 290), (1000, 970)]
)
def test_erlang_c_matches_exact_formula(c: int, a: int) -> None:
    assert erlang_c(c, float(a)) == pytest.approx(float(erlang_c_exact(c, a)), rel=1e-10)


def test_erlang_c_is_stable_for_large_systems() -> None:
    # a^c / c! overflows a float long before this (c = 1000 above); the recursion does not
    for c in (10_000, 100_000):
        p = erlang_c(c, 0.99 * c)
        assert 0.0 < p < 1.0
    # more load, more waiting
    loads = np.linspace(0.95, 0.999, 10) * 10_000
    probs = [erlang_c(10_000, a) for a in loads]
    assert all(p < q for p, q in itertools.pairwise(probs))
    with pytest.raises(ValueError):
        erlang_c(2, 2.0)


# --------------------------------------------------------------------------------------------
# M/M/c through the model
# --------------------------------------------------------------------------------------------

MEAN_SESSION_MIN = 30.0
WARMUP = 0.02  # fraction of the horizon whose arrivals are dropped

# relative sd at 30,000 customers of (mean wait, fraction waited); see the module docstring
_SD_30K: dict[tuple[int, float], tuple[float, float]] = {
    (1, 0.5): (0.030, 0.0094),
    (1, 0.7): (0.045, 0.0088),
    (1, 0.85): (0.077, 0.0084),
    (2, 0.5): (0.039, 0.0161),
    (2, 0.7): (0.052, 0.0142),
    (2, 0.85): (0.083, 0.0131),
    (4, 0.5): (0.059, 0.0302),
    (4, 0.7): (0.064, 0.0232),
    (4, 0.85): (0.093, 0.0202),
}
# customers per case: heavier loads get longer runs (about 12 s of cpu for all nine)
_CUSTOMERS = {0.5: 30_000, 0.7: 35_000, 0.85: 50_000}
CASES = sorted(_SD_30K)


def _sd(c: int, rho: float, n: int) -> tuple[float, float]:
    sw, sp = _SD_30K[(c, rho)]
    f = math.sqrt(30_000 / n)
    return sw * f, sp * f


def run_mmc(c: int, rho: float, n: int, seed: int) -> tuple[pd.DataFrame, float, float]:
    """Run ``n`` Poisson arrivals through one SimStation with ``c`` connectors and exponential
    sessions. Returns (trace, lambda, mu); the trace's run info holds the horizon (the instant of
    arrival n + 1, so exactly n customers arrive)."""
    mu = 1.0 / MEAN_SESSION_MIN
    lam = rho * c * mu
    rng = np.random.default_rng(seed)
    inter = rng.exponential(1.0 / lam, n + 1)
    service = rng.exponential(1.0 / mu, n)
    horizon = float(inter.sum())
    env = simpy.Environment()
    trace = TraceWriter(run_info={"source": "mmc", "horizon_min": horizon})
    connectors = tuple(ConnectorSpec(f"S/{k + 1}", 0, 50.0, "DC") for k in range(c))
    station = SimStation(env, 0, "S", "solo", connectors, trace)

    def plan_for(k: int):
        def plan(spec: ConnectorSpec, t_start: float) -> SessionPlan:
            return SessionPlan(float(service[k]), 0.0, 0.0, None, spec.power_kw)

        return plan

    def source():
        for k in range(n):
            yield env.timeout(float(inter[k]))
            env.process(station.visit(f"v{k}", f"s{k}", None, plan_for(k)))

    env.process(source())
    env.run(until=horizon)
    return trace.to_frame(), lam, mu


def drop_warmup(df: pd.DataFrame, t_warm: float) -> pd.DataFrame:
    """The trace without the sessions that arrived before ``t_warm`` (all their rows)."""
    early = df.loc[(df["kind"] == Kind.ARRIVE) & (df["t_min"] < t_warm), "session_id"]
    out = df[~df["session_id"].isin(set(early))]
    out.attrs = dict(df.attrs)
    return out


@pytest.fixture(scope="module")
def mmc_runs() -> dict[tuple[int, float], dict]:
    out = {}
    for c, rho in CASES:
        n = _CUSTOMERS[rho]
        df, lam, mu = run_mmc(c, rho, n, seed=1000 * c + round(100 * rho))
        horizon = float(df.attrs["evsim"]["horizon_min"])
        kept = drop_warmup(df, WARMUP * horizon)
        m = compute_metrics(kept, horizon)
        s = sessions_table(kept, horizon)
        started = s[s["t_start"].notna()]
        out[(c, rho)] = {
            "n": n,
            "lam": lam,
            "mu": mu,
            "horizon": horizon,
            "trace": kept,
            "metrics": m,
            "p_wait": float((started["wait_min"] > 0).mean()),
            "little": little_law(kept, horizon),
        }
    return out


@pytest.mark.parametrize(("c", "rho"), CASES)
def test_mmc_mean_wait_matches_erlang_c(mmc_runs: dict, c: int, rho: float) -> None:
    r = mmc_runs[(c, rho)]
    wq = mmc_wait(c, r["lam"], r["mu"])
    measured = r["metrics"]["wait_min"]["mean"]
    assert r["metrics"]["wait_min"]["n"] > 0.95 * r["n"]
    tol = max(0.07, 4 * _sd(c, rho, r["n"])[0])
    assert measured == pytest.approx(wq, rel=tol), (c, rho, measured, wq, tol)


@pytest.mark.parametrize(("c", "rho"), CASES)
def test_mmc_probability_of_waiting_matches_erlang_c(mmc_runs: dict, c: int, rho: float) -> None:
    r = mmc_runs[(c, rho)]
    pc = erlang_c(c, r["lam"] / r["mu"])
    tol = max(0.03, 4 * _sd(c, rho, r["n"])[1])
    assert r["p_wait"] == pytest.approx(pc, rel=tol), (c, rho, r["p_wait"], pc, tol)


def test_mmc_no_systematic_bias(mmc_runs: dict) -> None:
    """The nine cases are independent: their mean relative error has a much smaller spread."""
    errs, var = [], []
    for (c, rho), r in mmc_runs.items():
        wq = mmc_wait(c, r["lam"], r["mu"])
        errs.append(r["metrics"]["wait_min"]["mean"] / wq - 1.0)
        var.append(_sd(c, rho, r["n"])[0] ** 2)
    pooled_sd = math.sqrt(sum(var)) / len(var)
    assert abs(np.mean(errs)) <= 4 * pooled_sd, (np.mean(errs), pooled_sd, errs)


@pytest.mark.parametrize(("c", "rho"), CASES)
def test_mmc_little_law(mmc_runs: dict, c: int, rho: float) -> None:
    r = mmc_runs[(c, rho)]
    ll = r["little"]
    # the identity on the trace
    assert ll["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ll["L"] == pytest.approx(ll["lambda"] * ll["W"], rel=1e-6)
    # the same L as the metrics' mean queue length
    assert r["metrics"]["queue"]["mean_len"] == pytest.approx(ll["L"], rel=1e-9)
    # and L_q = lambda W_q against theory (arrivals after the warm-up only)
    lam_seen = r["lam"] * (1.0 - WARMUP)
    assert ll["lambda"] == pytest.approx(lam_seen, rel=0.03)
    lq = lam_seen * mmc_wait(c, r["lam"], r["mu"])
    tol = max(0.07, 4 * _sd(c, rho, r["n"])[0]) + 0.03
    assert ll["L"] == pytest.approx(lq, rel=tol), (c, rho, ll["L"], lq)


def test_mmc_station_never_exceeds_its_connectors(mmc_runs: dict) -> None:
    df = mmc_runs[(4, 0.85)]["trace"]
    step = df["kind"].map({Kind.SESSION_START: 1, Kind.SESSION_END: -1}).fillna(0)
    charging = step.cumsum()
    assert charging.max() == 4
    assert charging.min() >= 0


# --------------------------------------------------------------------------------------------
# real scenarios: Little's law and reproducibility
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_scenario(DATA_DIR / "tiny.toml")


@pytest.fixture(scope="module")
def bahia():
    return load_scenario()


@pytest.mark.parametrize("name", ["tiny", "bahia"])
@pytest.mark.parametrize("seed", [None, 11])
def test_little_law_on_scenario_runs(name: str, seed: int | None, request) -> None:
    scenario = request.getfixturevalue(name)
    res = Simulation(scenario, seed=seed).run()
    ll = little_law(res.trace, res.horizon_min)
    assert ll["arrivals"] > 0
    assert ll["ratio"] == pytest.approx(1.0, abs=1e-6)
    # the window-free call reads the horizon from the run info
    assert little_law(res.trace)["horizon_min"] == res.horizon_min


def test_same_seed_same_trace_different_seed_different_trace(bahia) -> None:
    a = Simulation(bahia, seed=5).run().trace
    b = Simulation(bahia, seed=5).run().trace
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs == b.attrs
    c = Simulation(bahia, seed=6).run().trace
    assert not a.equals(c)
    assert (
        not a[a["kind"] == Kind.TRIP_START]["t_min"]
        .reset_index(drop=True)
        .equals(c[c["kind"] == Kind.TRIP_START]["t_min"].reset_index(drop=True))
    )


def test_default_seed_is_the_scenarios(tiny) -> None:
    a = Simulation(tiny).run().trace
    b = Simulation(tiny, seed=tiny.seed).run().trace
    pd.testing.assert_frame_equal(a, b)

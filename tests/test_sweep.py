"""Parameter sweeps: grid expansion, validation, resuming, local pool vs Dask, the CLI."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from evsim.cli import app
from evsim.scenario import load_scenario
from evsim.sweep import expand_grid, parse_values, run_sweep

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = DATA / "tiny.toml"


@pytest.fixture(scope="module")
def tiny():
    return load_scenario(TINY)


def test_parse_values() -> None:
    assert parse_values("1, 2.5,trip,true") == [1, 2.5, "trip", True]
    with pytest.raises(ValueError):
        parse_values("1,,2")


def test_grid_expansion(tiny) -> None:
    specs = expand_grid(
        tiny,
        ["nearest", "balanced"],
        {"w_price": [0.5, 2], "network.status_delay_min": [0, 5]},
        seeds=2,
    )
    # nearest takes no w_price: 2 delays x 2 seeds; balanced: 2 prices x 2 delays x 2 seeds
    assert len(specs) == 4 + 8
    assert len({s.key for s in specs}) == len(specs)
    assert [s.index for s in specs] == list(range(len(specs)))
    nearest = [dict(s.columns) for s in specs if s.policy == "nearest"]
    assert all(c["w_price"] is None for c in nearest)
    assert {c["network.status_delay_min"] for c in nearest} == {0.0, 5.0}
    assert {s.seed for s in specs} == {tiny.seed, tiny.seed + 1}
    balanced = [s for s in specs if s.policy == "balanced"]
    assert {dict(s.policy_params)["w_price"] for s in balanced} == {0.5, 2.0}
    # explicit seed list, scenario values come back validated (int 0 -> float 0.0)
    specs = expand_grid(tiny, ["least_wait"], {"charging.threshold_soc": [0.2]}, seeds=[11, 12])
    assert [s.seed for s in specs] == [11, 12]
    assert dict(specs[0].scenario_params) == {"charging.threshold_soc": 0.2}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"w_prise": [1.0]}, "w_prise"),
        ({"network.status_dely_min": [1.0]}, "network.status_dely_min"),
        ({"network.status_delay_min": [-1.0]}, "network.status_delay_min"),
        ({"booking.mode": ["boat"]}, "booking.mode"),
        ({"charging.threshold_soc": [0.9]}, "charging.threshold_soc"),
    ],
)
def test_bad_param_names_the_key(tiny, params, named) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        run_sweep(tiny, ["balanced"], params, seeds=1, workers=1)


def test_unknown_policy(tiny) -> None:
    with pytest.raises(ValueError, match="nope"):
        expand_grid(tiny, ["nope"], None, seeds=1)


def test_resume_skips_done_runs(tiny, tmp_path: Path) -> None:
    out = tmp_path / "sweep.parquet"
    grid = {"network.status_delay_min": [0, 5]}
    ran: list[str] = []
    df = run_sweep(tiny, ["least_wait"], grid, seeds=2, out=out, workers=1, on_run=ran.append)
    assert len(ran) == 4 and len(df) == 4
    assert list(df.columns[:5]) == ["run_key", "scenario", "policy", "seed", *grid]
    assert df["sessions"].gt(0).all() and "wait_min.mean" in df
    stored = pd.read_parquet(out)
    assert len(stored) == 4

    ran.clear()
    again = run_sweep(tiny, ["least_wait"], grid, seeds=2, out=out, workers=1, on_run=ran.append)
    assert ran == []  # everything was already there
    pd.testing.assert_frame_equal(again, df)

    more = run_sweep(tiny, ["least_wait"], grid, seeds=3, out=out, workers=1, on_run=ran.append)
    assert len(ran) == 2 and len(more) == 6
    assert len(pd.read_parquet(out)) == 6


def test_interrupted_sweep_keeps_finished_chunks(tiny, tmp_path: Path) -> None:
    out = tmp_path / "sweep.parquet"
    grid = {"network.status_delay_min": [0, 1, 2]}
    seen: list[object] = []

    def stop_after_two(row: object) -> None:
        seen.append(row)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            tiny, ["nearest"], grid, seeds=1, out=out, workers=1, chunk=1, on_run=stop_after_two
        )
    assert len(pd.read_parquet(out)) == 2
    ran: list[object] = []
    df = run_sweep(tiny, ["nearest"], grid, seeds=1, out=out, workers=1, on_run=ran.append)
    assert len(ran) == 1 and len(df) == 3


def test_process_pool_and_dask_give_the_same_rows(tiny) -> None:
    from distributed import Client, LocalCluster

    grid = {"w_price": [0.5, 2.0]}
    kw = {"policies": ["nearest", "balanced"], "params": grid, "seeds": 2}
    serial = run_sweep(tiny, workers=1, **kw)
    pooled = run_sweep(tiny, workers=2, **kw)
    with (
        LocalCluster(
            n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        on_dask = run_sweep(tiny, dask=client, **kw)
        by_address = run_sweep(tiny, dask=cluster.scheduler_address, **kw)  # as --dask does
    assert len(serial) == 2 + 4
    pd.testing.assert_frame_equal(pooled, serial)
    pd.testing.assert_frame_equal(on_dask, serial)
    pd.testing.assert_frame_equal(by_address, serial)


def test_cli_sweep(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "s.parquet"
    args = [
        "sweep",
        str(TINY),
        "-p",
        "nearest",
        "-p",
        "balanced",
        "--param",
        "w_price=1,3",
        "--seeds",
        "1",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out)
    assert len(df) == 3 and set(df["policy"]) == {"nearest", "balanced"}
    assert "wait mean" in r.output
    bad = runner.invoke(
        app,
        ["sweep", str(TINY), "--param", "network.delay=1", "--out", str(tmp_path / "x.parquet")],
    )
    assert bad.exit_code == 2 and "network.delay" in bad.output
    bad = runner.invoke(app, ["sweep", str(TINY), "--param", "w_price"])
    assert bad.exit_code == 2

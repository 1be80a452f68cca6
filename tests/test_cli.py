"""The evsim CLI: simulate, compare, validate, metrics, policies; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from evsim.cli import app
from evsim.trace import read_trace

DATA = Path(__file__).resolve().parents[1] / "data"
runner = CliRunner()


def test_simulate_writes_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "simulate",
            str(DATA / "tiny.toml"),
            "--policy",
            "nearest",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    for name in (
        "trace.parquet",
        "metrics.json",
        "run.json",
        "wait_ecdf.png",
        "utilisation.png",
        "queue.png",
        "wait_hist.png",
    ):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    df = read_trace(out)
    assert m["sessions"] == int((df["kind"] == "session_start").sum()) > 0
    assert json.loads((out / "run.json").read_text())["policy"] == "nearest"
    assert "wait mean" in r.output


def test_simulate_param_and_unknown_policy(tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "simulate",
            str(DATA / "tiny.toml"),
            "--policy",
            "balanced",
            "--param",
            "w_price=2",
            "--out",
            str(tmp_path / "a"),
            "--no-plots",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["simulate", str(DATA / "tiny.toml"), "--policy", "fastest", "--out", str(tmp_path / "b")],
    )
    assert r.exit_code == 2 and "unknown policy 'fastest'" in r.output
    r = runner.invoke(
        app,
        [
            "simulate",
            str(DATA / "tiny.toml"),
            "--policy",
            "balanced",
            "--param",
            "w_bogus=1",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 2 and "w_bogus" in r.output
    r = runner.invoke(
        app,
        ["simulate", str(DATA / "tiny.toml"), "--param", "w_price", "--out", str(tmp_path / "d")],
    )
    assert r.exit_code == 2 and "KEY=NUMBER" in r.output


def test_validate_good_and_bad(tmp_path: Path) -> None:
    r = runner.invoke(app, ["validate", str(DATA / "bahia.toml")])
    assert r.exit_code == 0 and "70 stations" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text((DATA / "tiny.toml").read_text().replace("seed = 7", "sed = 7", 1))
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2
    assert "sed: unknown key" in r.output
    r = runner.invoke(app, ["validate", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "file not found" in r.output


def test_compare_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    r = runner.invoke(
        app,
        [
            "compare",
            str(DATA / "tiny.toml"),
            "-p",
            "nearest",
            "-p",
            "least_wait",
            "--seeds",
            "2",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (out / "wait_ecdf.png").stat().st_size > 0
    assert "least_wait" in r.output and "nearest" in r.output
    run = tmp_path / "run"
    runner.invoke(app, ["simulate", str(DATA / "tiny.toml"), "--out", str(run), "--no-plots"])
    r = runner.invoke(app, ["metrics", str(run)])
    assert r.exit_code == 0 and "sessions" in r.output
    r = runner.invoke(app, ["metrics", str(tmp_path / "nothing")])
    assert r.exit_code == 2


def test_policies_lists_builtins() -> None:
    r = runner.invoke(app, ["policies"])
    assert r.exit_code == 0
    for name in ("nearest", "least_wait", "balanced"):
        assert name in r.output


def test_booking_flag(tmp_path: Path) -> None:
    out = tmp_path / "trip"
    r = runner.invoke(app, ["simulate", str(DATA / "tiny.toml"), "--booking", "trip",
                            "--out", str(out), "--no-plots"])
    assert r.exit_code == 0, r.output
    df = read_trace(out)
    assert (df["kind"] == "trip_booking").any()  # trips were booked through the protocol
    assert json.loads((out / "run.json").read_text())["booking"] == "trip"
    r = runner.invoke(app, ["simulate", str(DATA / "tiny.toml"), "--booking", "bogus",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown booking mode 'bogus'" in r.output
    r = runner.invoke(app, ["compare", str(DATA / "tiny.toml"), "-p", "nearest", "--seeds", "1",
                            "--booking", "on_arrival,trip", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    runs = pd.read_parquet(tmp_path / "c" / "runs.parquet")
    assert set(runs["policy"]) == {"nearest+on_arrival", "nearest+trip"}

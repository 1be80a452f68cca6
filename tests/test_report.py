"""Run reports: HTML + Markdown with figures and the agreement of every run with the first."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from evsim.api import simulate
from evsim.cli import app
from evsim.report import write_report
from evsim.stats import agreement, bootstrap_mean_diff, ks_test, mean_ci, paired_diff_ci
from evsim.trace import read_trace

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, seed in (("seed1", 1), ("seed2", 2)):
        simulate(DATA / "tiny.toml", policy="least_wait", seed=seed, out=root / name, plots=False)
        out[name] = root / name
    # a live-like copy of seed1: run information says source=live, no connector_status rows
    # for one station (a live network only reports what it saw), times shifted by a few ms
    table = pq.read_table(out["seed1"] / "trace.parquet")
    df = table.to_pandas()
    df = df[~((df["kind"] == "connector_status") & (df["station_id"] == "zap_delta"))]
    df["t_min"] = df["t_min"] + 1e-4
    info = json.loads(table.schema.metadata[b"evsim"])
    info.update(source="live", policy="least_wait")
    import pyarrow as pa

    live = pa.Table.from_pandas(df, schema=table.schema.remove_metadata(), preserve_index=False)
    live = live.replace_schema_metadata({b"evsim": json.dumps(info).encode()})
    (root / "live").mkdir()
    pq.write_table(live, root / "live" / "trace.parquet")
    out["live"] = root / "live"
    return out


def test_report_writes_html_and_markdown(runs: dict[str, Path], tmp_path: Path) -> None:
    html_path = write_report([runs["seed1"], runs["seed2"]], tmp_path / "rep")
    assert html_path == tmp_path / "rep" / "report.html"
    page = html_path.read_text()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert page.count("data:image/png;base64,") == 4  # ECDF, utilisation, queue, revenue
    for fig in ("wait_ecdf", "utilisation", "queue", "revenue"):
        assert (tmp_path / "rep" / "figures" / f"{fig}.png").stat().st_size > 0
        assert f"figures/{fig}.png" in md
    for text in (
        "Agreement with the reference run",
        "KS D",
        "95% CI",
        "Jain companies",
        "energy (kWh)",
        "stranded vehicles",
        "seed1 (sim)",
        "seed2 (sim)",
    ):
        assert text in md, text
        assert text in page, text
    assert "PASS" in md or "FAIL" in md
    agree = (tmp_path / "rep" / "agreement.csv").read_text()
    assert agree.startswith("run,") and "seed2 (sim)" in agree


def test_identical_runs_agree_exactly(runs: dict[str, Path]) -> None:
    df = read_trace(runs["seed1"])
    a = agreement(df, df)
    assert a["ks_d"] == 0.0 and a["ks_p"] == 1.0
    assert a["mean_diff"] == 0.0 and a["mean_diff_lo"] <= 0.0 <= a["mean_diff_hi"]
    assert a["util_pp_max"] == 0.0 and a["stations_compared"] == 4
    assert a["mean_wait_ok"] and a["ks_ok"] and a["util_ok"]


def test_different_seed_differs(runs: dict[str, Path]) -> None:
    a = agreement(read_trace(runs["seed1"]), read_trace(runs["seed2"]))
    assert a["ks_d"] > 0.0 and 0.0 <= a["ks_p"] <= 1.0
    assert a["mean_diff_lo"] <= a["mean_diff"] <= a["mean_diff_hi"]
    assert a["util_pp_max"] >= a["util_pp_mean"] > 0.0


def test_live_trace_is_accepted(runs: dict[str, Path], tmp_path: Path) -> None:
    write_report([runs["seed1"], runs["live"]], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "live (live)" in md and "| live |" in md
    a = agreement(read_trace(runs["seed1"]), read_trace(runs["live"]))
    assert a["ks_d"] == 0.0 and a["util_ok"]  # same sessions, shifted by 1e-4 min


def test_labels_and_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    write_report([runs["seed1"], runs["seed1"]], tmp_path / "r", labels=["sim", "again"])
    assert "| again |" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(ValueError, match="label"):
        write_report([runs["seed1"]], tmp_path / "r", labels=["a", "b"])
    with pytest.raises(FileNotFoundError):
        write_report([tmp_path / "missing"], tmp_path / "r")
    single = write_report([runs["seed1"]], tmp_path / "one")  # one run: no agreement section
    assert "Agreement" not in single.read_text()


def test_cli_report(runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app, ["report", str(runs["seed1"]), str(runs["seed2"]), "--out", str(tmp_path / "rep")]
    )
    assert r.exit_code == 0, r.output
    assert "agreement" in r.output and (tmp_path / "rep" / "report.html").exists()
    copy = tmp_path / "copy"
    shutil.copytree(runs["seed1"], copy)
    r = runner.invoke(app, ["report", str(copy), str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no trace" in r.output


def test_statistics() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.exponential(10, 400), rng.exponential(10, 400) + 5
    d1 = bootstrap_mean_diff(a, b, seed=1)
    assert d1 == bootstrap_mean_diff(a, b, seed=1)  # seeded
    assert d1[1] < d1[0] < d1[2] and d1[1] > 0  # +5 shift detected
    assert ks_test(a, a) == (0.0, 1.0) and ks_test(a, b)[0] > 0.1
    assert math.isnan(bootstrap_mean_diff([], b)[0])
    m, half = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and half == pytest.approx(2.484, abs=1e-3)
    d, half = paired_diff_ci([1.0, 2.0, 3.0], [2.0, 3.1, 3.9])
    assert d == pytest.approx(1.0) and half < 0.3

"""The report figures write readable, non-empty PNGs and leave no pyplot state behind."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_metrics import SESSIONS, build  # tests/ is on sys.path (pytest rootdir-style import)

from evsim.plots import (
    PLOT_FILES,
    plot_queue,
    plot_utilisation,
    plot_wait_ecdf,
    plot_wait_hist,
    write_plots,
)
from evsim.trace import TraceWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def trace():
    return build(TraceWriter(run_info={"horizon_min": 100.0})).to_frame()


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5_000


def _open_pyplot_figures() -> int:
    plt = sys.modules.get("matplotlib.pyplot")
    return len(plt.get_fignums()) if plt is not None else 0


def test_write_plots(trace, tmp_path) -> None:
    before = _open_pyplot_figures()
    paths = write_plots(trace, tmp_path / "plots")
    assert [p.name for p in paths] == list(PLOT_FILES)
    assert all(_is_png(p) for p in paths)
    assert _open_pyplot_figures() == before


def test_each_plot(trace, tmp_path) -> None:
    other = build(TraceWriter(run_info={"horizon_min": 100.0}), sessions=SESSIONS[:3]).to_frame()
    assert _is_png(plot_wait_ecdf({"policy A": trace, "policy B": other}, tmp_path / "e.png"))
    assert _is_png(plot_wait_ecdf(trace, tmp_path / "single.png"))
    assert _is_png(plot_wait_hist(trace, tmp_path / "h.png"))
    assert _is_png(plot_utilisation(trace, tmp_path / "u.png"))
    assert _is_png(plot_queue(trace, tmp_path / "q.png"))
    assert _is_png(plot_queue(trace, tmp_path / "q_s1.png", station_id="S1"))


def test_plots_of_empty_runs(tmp_path) -> None:
    empty = TraceWriter().to_frame()
    no_sessions = build(TraceWriter(run_info={"horizon_min": 60.0}), sessions=()).to_frame()
    for i, df in enumerate((empty, no_sessions)):
        paths = write_plots(df, tmp_path / f"r{i}")
        assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
    assert _is_png(plot_wait_ecdf({"a": no_sessions, "b": empty}, tmp_path / "e.png"))


def test_many_stations(tmp_path) -> None:
    rng = np.random.default_rng(1)
    w = TraceWriter(run_info={"horizon_min": 600.0})
    for i in range(80):
        w.emit(
            0,
            "connector_status",
            station_id=f"S{i}",
            company_id=f"C{i % 4}",
            connector_id=f"c{i}",
            power_kw=50.0,
            status="Available",
        )
    t = 0.0
    for k in range(200):
        t += float(rng.exponential(2.0))
        i = int(rng.integers(80))
        base = dict(
            session_id=f"s{k}", vehicle_id=f"v{k}", station_id=f"S{i}", company_id=f"C{i % 4}"
        )
        w.emit(t, "arrive", **base)
        w.emit(t + 1, "session_start", connector_id=f"c{i}", **base)
    assert _is_png(plot_utilisation(w.to_frame(), tmp_path / "u.png"))

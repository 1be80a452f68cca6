"""Report figures drawn from a trace (simulated or live; see :mod:`evsim.metrics`).

Figures are built as :class:`matplotlib.figure.Figure` objects on an explicit Agg canvas, never
through ``pyplot``: no global figure state is created or leaked, the process-wide backend is left
alone (notebooks keep theirs), and the module is safe in servers, tests and worker processes.

* :func:`plot_wait_ecdf` overlays the wait-time ECDF of several runs (compare policies).
* :func:`plot_wait_hist`, :func:`plot_utilisation`, :func:`plot_queue` describe one run.
* :func:`write_plots` writes the standard set into a run directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from evsim.metrics import (
    _queue_series,
    _step_integral,
    _utilisation,
    _window,
    natural_key,
    resolve_horizon,
    sessions_table,
)

__all__ = ["plot_queue", "plot_utilisation", "plot_wait_ecdf", "plot_wait_hist", "write_plots"]

PLOT_FILES = ("wait_ecdf.png", "wait_hist.png", "utilisation.png", "queue.png")
_DPI = 120


def _figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    return p


def _waits(df: pd.DataFrame, horizon_min: float | None = None) -> np.ndarray:
    """Waits (min) of sessions that started charging inside the horizon."""
    horizon = resolve_horizon(df, horizon_min)
    s = sessions_table(df, horizon_min=horizon)
    return s.loc[s["t_start"].notna(), "wait_min"].dropna().to_numpy(dtype=float)


def _no_data(ax: Axes, text: str = "no sessions in this run") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_wait_ecdf(
    traces: Mapping[str, pd.DataFrame] | pd.DataFrame,
    path: str | Path,
    *,
    title: str = "Waiting time before charging",
) -> Path:
    """Overlaid ECDFs of the wait (arrival -> plug-in, minutes) of each labelled trace, with
    p50 (circle) and p95 (triangle) markers. A single DataFrame is drawn as one curve."""
    if isinstance(traces, pd.DataFrame):
        traces = {"run": traces}
    fig, ax = _figure()
    colours = matplotlib.colormaps["tab10"]
    drawn = False
    for i, (label, df) in enumerate(traces.items()):
        colour = colours(i % 10)
        w = np.sort(_waits(df))
        if w.size == 0:
            ax.plot([], [], color=colour, label=f"{label} (no sessions)")
            continue
        y = np.arange(1, w.size + 1) / w.size
        p50, p95 = np.percentile(w, [50, 95])
        ax.step(
            np.concatenate([[0.0], w]),
            np.concatenate([[0.0], y]),
            where="post",
            color=colour,
            lw=1.8,
            label=f"{label}: n={w.size}, p50={p50:.1f}, p95={p95:.1f} min",
        )
        ax.plot([p50], [0.50], "o", color=colour, ms=7, mec="black", zorder=3)
        ax.plot([p95], [0.95], "^", color=colour, ms=8, mec="black", zorder=3)
        drawn = True
    for q in (0.5, 0.95):
        ax.axhline(q, color="0.7", lw=0.8, ls=":", zorder=0)
    if not drawn:
        _no_data(ax)
    ax.set_xlim(left=0.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("wait: arrival to plug-in (min)")
    ax.set_ylabel("fraction of sessions waiting ≤ x")
    ax.set_title(f"{title} (ECDF; ● p50, ▲ p95)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_wait_hist(
    df: pd.DataFrame, path: str | Path, *, bins: int = 40, horizon_min: float | None = None
) -> Path:
    """Histogram of the waits (minutes) of sessions that started charging, with mean and p95.

    Zero waits are counted in the title rather than drawn when some sessions did wait."""
    fig, ax = _figure()
    w = _waits(df, horizon_min)
    title = "Distribution of waiting time"
    if w.size:
        zero = int((w == 0).sum())
        # plugging in at once is usually the bulk: it would flatten every other bar, so it is
        # reported in the title and only the sessions that waited are binned
        shown = w[w > 0] if 0 < zero < w.size else w
        top = float(shown.max())
        what = "sessions that waited" if shown.size < w.size else "sessions"
        ax.hist(
            shown,
            bins=bins,
            range=(0.0, top if top > 0 else 1.0),
            color="tab:blue",
            alpha=0.8,
            edgecolor="white",
            label=f"{what} (n={shown.size})",
        )
        mean, p95 = float(w.mean()), float(np.percentile(w, 95))
        ax.axvline(mean, color="black", lw=1.5, ls="--", label=f"mean {mean:.1f} min (all)")
        ax.axvline(p95, color="tab:red", lw=1.5, ls=":", label=f"p95 {p95:.1f} min (all)")
        ax.legend(loc="upper right", fontsize=9)
        title += f": {zero / w.size:.0%} of {w.size} sessions plugged in without waiting"
    else:
        _no_data(ax)
    ax.set_xlabel("wait: arrival to plug-in (min)")
    ax.set_ylabel("sessions")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_utilisation(
    df: pd.DataFrame, path: str | Path, *, horizon_min: float | None = None
) -> Path:
    """Utilisation (% of connector-time occupied) per station, bars coloured by company, with
    the network mean as a line. Stations are grouped by company."""
    horizon = resolve_horizon(df, horizon_min)
    w = _window(df, horizon)
    util = _utilisation(w, sessions_table(w), horizon)
    util = util[util["station_id"].notna()].copy()
    util["company_id"] = util["company_id"].fillna("?")
    g = util.groupby(["company_id", "station_id"]).agg(
        occupied=("occupied_min", "sum"), connectors=("occupied_min", "size")
    )
    g = g.iloc[sorted(range(len(g)), key=lambda i: tuple(map(natural_key, g.index[i])))]
    n = len(g)
    fig, ax = _figure(width=min(max(8.0, 0.28 * n + 2.0), 24.0))
    if n == 0 or horizon <= 0:
        _no_data(ax, "no connectors or zero horizon")
    else:
        pct = 100.0 * g["occupied"] / (horizon * g["connectors"])
        companies = list(dict.fromkeys(g.index.get_level_values("company_id")))
        colours = matplotlib.colormaps["tab10" if len(companies) <= 10 else "tab20"]
        cmap = {c: colours(i % colours.N) for i, c in enumerate(companies)}
        x = np.arange(n)
        bar_colours = [cmap[c] for c in g.index.get_level_values("company_id")]
        ax.bar(x, pct.to_numpy(), color=bar_colours, edgecolor="black", lw=0.3)
        mean = 100.0 * util["occupied_min"].sum() / (horizon * len(util))
        ax.axhline(mean, color="black", ls="--", lw=1.2)
        handles: list[Artist] = [Patch(color=cmap[c], label=str(c)) for c in companies]
        handles.append(Line2D([], [], color="black", ls="--", label=f"mean {mean:.1f}%"))
        ax.legend(handles=handles, title="company", fontsize=9, loc="upper right")
        stations = [str(s) for s in g.index.get_level_values("station_id")]
        if n <= 60:
            ax.set_xticks(x, stations, rotation=90 if n > 12 else 0, fontsize=8)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{n} stations, grouped by company")
        ax.set_ylim(0.0, max(100.0, float(pct.max()) * 1.05))
    if n <= 60:
        ax.set_xlabel("station")
    ax.set_ylabel("utilisation (% of connector time)")
    ax.set_title(f"Connector utilisation per station over {horizon / 60:.1f} h")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_queue(
    df: pd.DataFrame,
    path: str | Path,
    *,
    station_id: str | None = None,
    horizon_min: float | None = None,
) -> Path:
    """Vehicles waiting (network-wide, or at ``station_id``) over time in hours, with the
    time-average."""
    horizon = resolve_horizon(df, horizon_min)
    w = _window(df, horizon)
    series = _queue_series(sessions_table(w), station_id)
    fig, ax = _figure(width=10.0)
    t = np.append(series["t_min"].to_numpy(dtype=float), horizon) / 60.0
    q = series["queue_len"].to_numpy(dtype=float)
    q = np.append(q, q[-1])
    ax.step(t, q, where="post", color="tab:blue", lw=1.2, label="vehicles waiting")
    ax.fill_between(t, q, step="post", color="tab:blue", alpha=0.2)
    if horizon > 0:
        area, max_len = _step_integral(series, horizon)
        mean = area / horizon
        ax.axhline(mean, color="black", ls="--", lw=1.2, label=f"time-average {mean:.2f}")
        ax.set_xlim(0.0, horizon / 60.0)
        ax.set_ylim(0.0, max(1.0, max_len) * 1.25)  # headroom for the legend
    ax.set_xlabel("time (h)")
    ax.set_ylabel("vehicles waiting to charge")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    where = f"station {station_id}" if station_id is not None else "whole network"
    ax.set_title(f"Queue length over time ({where})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, ncols=2)
    return _save(fig, path)


def write_plots(df: pd.DataFrame, out_dir: str | Path, *, label: str = "run") -> list[Path]:
    """Write wait_ecdf.png, wait_hist.png, utilisation.png and queue.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_wait_ecdf({label: df}, out / PLOT_FILES[0]),
        plot_wait_hist(df, out / PLOT_FILES[1]),
        plot_utilisation(df, out / PLOT_FILES[2]),
        plot_queue(df, out / PLOT_FILES[3]),
    ]

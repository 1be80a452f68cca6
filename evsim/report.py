"""Reports that put several runs side by side: simulated, live, or any mix.

:func:`write_report` reads run directories (each with a ``trace.parquet``; the run information
in the trace says whether it is ``sim`` or ``live``) and writes into ``out``:

* ``report.html``: one self-contained page, figures embedded as base64 PNG;
* ``report.md``: the same tables in Markdown, linking the figures in ``figures/``;
* ``figures/*.png``: wait-time ECDFs, per-station utilisation, queue length, revenue;
* ``agreement.csv``: the agreement table (with two or more runs).

The first run is the reference: every other run gets agreement statistics against it
(:func:`evsim.stats.agreement`: difference of mean waits with a seeded bootstrap 95% CI, the
two-sample KS statistic and p-value on the waits, per-station utilisation differences in
percentage points) and pass/fail verdicts for the tolerances of :data:`evsim.stats.TOLERANCES`.
``evsim report RUN_DIR [RUN_DIR ...] --out DIR`` is the command-line form.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evsim.metrics import compute_metrics, natural_key, queue_length_series
from evsim.plots import plot_wait_ecdf
from evsim.stats import TOLERANCES, agreement, waits
from evsim.trace import read_trace, run_info

__all__ = ["Run", "agreement_table", "load_runs", "write_report"]

_DPI = 110


@dataclass
class Run:
    label: str
    path: Path
    source: str
    info: dict[str, Any]
    trace: pd.DataFrame
    metrics: dict[str, Any]


def load_runs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Read each run's trace and metrics. Default label: ``<dir name> (<source>)``."""
    if not run_dirs:
        raise ValueError("no run directory given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} label(s) for {len(run_dirs)} run(s)")
    runs: list[Run] = []
    used: set[str] = set()
    for i, d in enumerate(run_dirs):
        p = Path(d)
        df = read_trace(p)
        info = run_info(df)
        source = str(info.get("source") or "unknown")
        name = p.name if p.is_dir() else p.parent.name
        label = labels[i] if labels is not None else f"{name} ({source})"
        base, k = label, 2
        while label in used:  # two runs with the same name stay distinguishable
            label, k = f"{base} #{k}", k + 1
        used.add(label)
        runs.append(Run(label, p, source, info, df, compute_metrics(df)))
    return runs


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _num(x: Any) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return math.nan
    return f


def runs_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = r.metrics
        rows.append(
            {
                "run": r.label,
                "source": r.source,
                "scenario": r.info.get("scenario", "-"),
                "policy": r.info.get("policy", "-"),
                "seed": r.info.get("seed", "-"),
                "horizon (h)": _num(m["horizon_min"]) / 60.0,
                "trips started": m["trips"]["started"],
                "trips completed": m["trips"]["completed"],
                "sessions": m["sessions"],
                "abandoned": m["abandoned"],
                "stranded": m["stranded"],
            }
        )
    return pd.DataFrame(rows)


def wait_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        w = waits(r.trace)
        row: dict[str, Any] = {"run": r.label, "n": int(w.size)}
        if w.size:
            row["mean (min)"] = float(w.mean())
            for q in (50, 90, 95, 99):
                row[f"p{q} (min)"] = float(np.percentile(w, q))
            row["max (min)"] = float(w.max())
            row["waited > 0"] = f"{(w > 0).mean():.0%}"
        rows.append(row)
    return pd.DataFrame(rows)


def balance_table(runs: Sequence[Run]) -> pd.DataFrame:
    companies = sorted(
        {c for r in runs for c in r.metrics["utilisation"]["per_company"]}, key=natural_key
    )
    rows = []
    for r in runs:
        b, u = r.metrics["balance"], r.metrics["utilisation"]
        row: dict[str, Any] = {"run": r.label}
        for c in companies:
            row[f"util {c} (%)"] = 100.0 * _num(u["per_company"].get(c))
        row["util mean (%)"] = 100.0 * _num(u["mean"])
        row["Jain companies"] = _num(b["companies"]["jain"])
        row["CV companies"] = _num(b["companies"]["cv"])
        row["Jain stations"] = _num(b["stations"]["jain"])
        row["CV stations"] = _num(b["stations"]["cv"])
        rows.append(row)
    return pd.DataFrame(rows)


def energy_table(runs: Sequence[Run]) -> pd.DataFrame:
    companies = sorted(
        {c for r in runs for c in r.metrics["revenue"]["per_company"]}, key=natural_key
    )
    rows = []
    for r in runs:
        m = r.metrics
        row: dict[str, Any] = {
            "run": r.label,
            "sessions completed": m["sessions_completed"],
            "energy (kWh)": _num(m["energy_kwh"]),
            "revenue total": _num(m["revenue"]["total"]),
        }
        for c in companies:
            row[f"revenue {c}"] = _num(m["revenue"]["per_company"].get(c, 0.0))
        n = m["sessions_completed"]
        row["kWh / session"] = _num(m["energy_kwh"]) / n if n else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def stranded_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        kind = r.trace["kind"]
        rows.append(
            {
                "run": r.label,
                "stranded vehicles": r.metrics["stranded"],
                "no reachable station": int((kind == "no_station").sum()),
                "abandoned queues": r.metrics["abandoned"],
                "trips not completed": r.metrics["trips"]["started"]
                - r.metrics["trips"]["completed"],
                "detour mean (km)": _num(r.metrics["detour_km"]["mean"]),
            }
        )
    return pd.DataFrame(rows)


def _verdict(v: Any) -> str:
    return "n/a" if v is None else ("PASS" if v else "FAIL")


def agreement_table(runs: Sequence[Run], *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per run after the first: its agreement with the first run."""
    ref = runs[0]
    rows = []
    for r in runs[1:]:
        a = agreement(ref.trace, r.trace, n_resamples=n_resamples, seed=seed)
        rows.append(
            {
                "run": r.label,
                "mean wait (min)": a["mean_wait"],
                "reference (min)": a["mean_wait_ref"],
                "diff (min)": a["mean_diff"],
                "95% CI": f"[{a['mean_diff_lo']:.2f}, {a['mean_diff_hi']:.2f}]",
                "diff (%)": 100.0 * a["mean_diff_rel"],
                "KS D": a["ks_d"],
                "KS p": a["ks_p"],
                "util max |Δ| (pp)": a["util_pp_max"],
                "util mean |Δ| (pp)": a["util_pp_mean"],
                "stations": a["stations_compared"],
                f"mean wait ±{TOLERANCES['mean_wait_rel']:.0%}": _verdict(a["mean_wait_ok"]),
                f"KS D < {TOLERANCES['ks_d']:g}": _verdict(a["ks_ok"]),
                f"util ≤ {TOLERANCES['util_pp']:g} pp": _verdict(a["util_ok"]),
            }
        )
    return pd.DataFrame(rows)


def station_table(runs: Sequence[Run]) -> pd.DataFrame:
    per = {r.label: r.metrics["utilisation"]["per_station"] for r in runs}
    stations = sorted({s for d in per.values() for s in d}, key=natural_key)
    df = pd.DataFrame(
        {label: [100.0 * _num(d.get(s)) for s in stations] for label, d in per.items()},
        index=pd.Index(stations, name="station"),
    )
    if len(runs) > 1:
        df[f"max |Δ| vs {runs[0].label} (pp)"] = (
            df.iloc[:, 1:].sub(df.iloc[:, 0], axis=0).abs().max(axis=1)
        )
    return df.reset_index()


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _colours(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_station_utilisation(runs: Sequence[Run], path: Path) -> Path:
    """Grouped bars: utilisation (% of connector time) per station, one bar per run."""
    per = [r.metrics["utilisation"]["per_station"] for r in runs]
    stations = sorted({s for d in per for s in d}, key=natural_key)
    n, k = len(stations), len(runs)
    fig, ax = _figure(min(max(8.0, 0.16 * n * k + 2.5), 26.0), 4.8)
    x = np.arange(n)
    width = 0.8 / max(k, 1)
    for i, (r, d, c) in enumerate(zip(runs, per, _colours(k), strict=True)):
        vals = [100.0 * _num(d.get(s)) for s in stations]
        mean = 100.0 * _num(r.metrics["utilisation"]["mean"])
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            vals,
            width=width,
            color=c,
            edgecolor="black",
            lw=0.2,
            label=f"{r.label} (network mean {mean:.1f}%)",
        )
    ax.set_xticks(x, stations, rotation=90 if n > 10 else 0, fontsize=7 if n > 30 else 9)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0.0, 105.0)
    ax.set_xlabel("station")
    ax.set_ylabel("utilisation (% of connector time)")
    ax.set_title("Connector utilisation per station, runs side by side")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path)
    return path


def plot_queues(runs: Sequence[Run], path: Path) -> Path:
    """Vehicles waiting network-wide over time (hours), one step line per run."""
    fig, ax = _figure(10.0, 4.5)
    top = 1.0
    for r, c in zip(runs, _colours(len(runs)), strict=True):
        horizon = _num(r.metrics["horizon_min"])
        s = queue_length_series(r.trace)
        s = s[s["t_min"] <= horizon]
        t = np.append(s["t_min"].to_numpy(float), horizon) / 60.0
        q = s["queue_len"].to_numpy(float)
        q = np.append(q, q[-1] if q.size else 0.0)
        mean = _num(r.metrics["queue"]["mean_len"])
        ax.step(
            t,
            q,
            where="post",
            color=c,
            lw=1.2,
            alpha=0.9,
            label=f"{r.label}: time-average {mean:.2f}, max {r.metrics['queue']['max_len']}",
        )
        top = max(top, float(q.max()) if q.size else 0.0)
    horizons = [_num(r.metrics["horizon_min"]) for r in runs]
    ax.set_xlim(0.0, max([h for h in horizons if math.isfinite(h)] or [60.0]) / 60.0)
    ax.set_ylim(0.0, top * 1.3)  # headroom for the legend
    ax.set_xlabel("time (h)")
    ax.set_ylabel("vehicles waiting to charge")
    ax.set_title("Queue length over time (whole network)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path)
    return path


def plot_revenue(runs: Sequence[Run], path: Path) -> Path:
    """Grouped bars: revenue per company (tariff currency), one bar per run, energy in legend."""
    companies = sorted(
        {c for r in runs for c in r.metrics["revenue"]["per_company"]}, key=natural_key
    )
    k = len(runs)
    fig, ax = _figure(max(6.0, 1.2 * len(companies) * max(k, 1) * 0.6 + 3.0), 4.2)
    x = np.arange(len(companies))
    width = 0.8 / max(k, 1)
    for i, (r, c) in enumerate(zip(runs, _colours(k), strict=True)):
        vals = [_num(r.metrics["revenue"]["per_company"].get(co, 0.0)) for co in companies]
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            vals,
            width=width,
            color=c,
            edgecolor="black",
            lw=0.3,
            label=f"{r.label}: {_num(r.metrics['energy_kwh']):,.0f} kWh, "
            f"{_num(r.metrics['revenue']['total']):,.0f} total",
        )
    top = max(
        [_num(v) for r in runs for v in r.metrics["revenue"]["per_company"].values()] or [1.0]
    )
    ax.set_ylim(0.0, max(top, 1.0) * (1.25 + 0.08 * k))  # headroom for the legend
    ax.set_xticks(x, companies)
    ax.set_xlabel("company")
    ax.set_ylabel("revenue (tariff currency)")
    ax.set_title("Revenue per company (completed sessions)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=2 if k > 2 else 1)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _cell(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        f = float(v)
        if f != 0 and abs(f) < 10**-digits:
            return f"{f:.2g}"
        return f"{f:,.{digits}f}"
    return str(v)


_DIGITS: dict[str, int] = {"KS D": 3, "KS p": 3}


def _digits(col: str) -> int:
    if col in _DIGITS:
        return _DIGITS[col]
    if col.startswith(("Jain", "CV")):
        return 3
    if "kWh)" in col or col.startswith("revenue"):
        return 0
    return 2


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c).replace("|", "\\|") for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for _, row in df.iterrows():
        cells = [_cell(row[c], _digits(str(c))).replace("|", "\\|") for c in df.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            text = _cell(row[c], _digits(str(c)))
            cls = {"PASS": "pass", "FAIL": "fail", "n/a": "na"}.get(text, "")
            if not cls and isinstance(row[c], int | float | np.integer | np.floating):
                cls = "num"
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pass{background:#d9f2d9;color:#185c18;font-weight:600;text-align:center}
td.fail{background:#f8d7d7;color:#8a1010;font-weight:600;text-align:center}
td.na{color:#888;text-align:center}
img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#555;font-size:.9rem}
"""


@dataclass
class _Section:
    title: str
    text: str = ""
    tables: tuple[pd.DataFrame, ...] = ()
    figure: Path | None = None
    collapsed_table: bool = False


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Write ``report.html`` (figures embedded), ``report.md`` and ``figures/`` into ``out``
    for the runs in ``run_dirs`` (the first is the reference); returns the HTML path."""
    step = on_step or (lambda _msg: None)
    out_dir = Path(out)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    step("reading traces")
    runs = load_runs(run_dirs, labels)

    step("drawing figures")
    ecdf = plot_wait_ecdf(
        {r.label: r.trace for r in runs},
        fig_dir / "wait_ecdf.png",
        title="Waiting time before charging",
    )
    util = plot_station_utilisation(runs, fig_dir / "utilisation.png")
    queue = plot_queues(runs, fig_dir / "queue.png")
    revenue = plot_revenue(runs, fig_dir / "revenue.png")

    step("agreement statistics")
    ref = runs[0].label
    sections = [_Section("Runs", tables=(runs_table(runs),))]
    agree_csv = out_dir / "agreement.csv"
    agree_csv.unlink(missing_ok=True)
    if len(runs) > 1:
        tol = TOLERANCES
        agree = agreement_table(runs, n_resamples=n_resamples, seed=seed)
        agree.to_csv(agree_csv, index=False)
        sections.append(
            _Section(
                f"Agreement with the reference run: {ref}",
                (
                    f"Each run against the first. Mean-wait difference (run - reference) with "
                    f"a percentile-bootstrap 95% CI ({n_resamples:,} resamples, seed {seed}); "
                    "two-sample Kolmogorov-Smirnov test on the session waits; absolute "
                    "per-station utilisation differences in percentage points over the "
                    f"stations both runs report. Verdicts: mean wait within "
                    f"{tol['mean_wait_rel']:.0%} of the reference, KS D < {tol['ks_d']:g}, "
                    f"every station within {tol['util_pp']:g} points."
                ),
                (agree,),
            )
        )
    sections += [
        _Section(
            "Waiting time (arrival to plug-in)",
            "Sessions that started charging inside the horizon. ● p50, ▲ p95 on the curves.",
            (wait_table(runs),),
            ecdf,
        ),
        _Section(
            "Utilisation per station",
            "Occupied connector time / (horizon x connectors), in %.",
            (station_table(runs),),
            util,
            collapsed_table=True,
        ),
        _Section("Queue length over time", "Vehicles waiting network-wide.", (), queue),
        _Section(
            "Balance across companies and stations",
            "Jain's index (1 = perfectly even) and coefficient of variation (0 = even) of "
            "utilisation.",
            (balance_table(runs),),
        ),
        _Section("Energy and revenue", "", (energy_table(runs),), revenue),
        _Section("Stranded vehicles and unmet demand", "", (stranded_table(runs),)),
    ]

    step("writing report")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = "evsim report: " + ", ".join(r.label for r in runs)
    intro = f"{len(runs)} run(s), reference {ref}. Generated {when}."
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(intro)}</p>']
    for s in sections:
        md += [f"## {s.title}", ""]
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            md += [s.text, ""]
            body.append(f'<p class="note">{html.escape(s.text)}</p>')
        if s.figure is not None:
            rel = s.figure.relative_to(out_dir).as_posix()
            md += [f"![{s.title}]({rel})", ""]
            b64 = base64.b64encode(s.figure.read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{b64}">')
        for t in s.tables:
            md += [_md_table(t), ""]
            table = _html_table(t)
            if s.collapsed_table:
                table = f"<details><summary>table ({len(t)} rows)</summary>{table}</details>"
            body.append(table)
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    (out_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return html_path

"""The ``evsim`` command line: simulate, compare, validate, policies (typer + rich).

Sub-commands from other packages plug in through the ``evsim.cli`` entry-point group (the
live network adds ``evsim live ...`` that way), so evsim never imports them by name.
Bad input (a scenario with a typo, an unknown policy, a bad ``--param``) prints what is wrong
and exits with status 2.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from evsim.scenario import ScenarioError, load_scenario

app = typer.Typer(
    name="evsim",
    help="A lab for EV charging networks: simulate policies, compare them, run them live.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

ScenarioArg = Annotated[
    Path | None,
    typer.Argument(help="Scenario TOML file (default: the Bahia scenario shipped in data/)."),
]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _parse_params(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--param {item!r}: expected KEY=NUMBER")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            _fail(f"--param {item!r}: {value!r} is not a number")
    return out


def _load(path: Path | None) -> Any:
    try:
        return load_scenario(path)
    except ScenarioError as err:
        _fail(str(err))


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    w, u, b = metrics["wait_min"], metrics["utilisation"], metrics["balance"]
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        (
            "sessions (started / completed)",
            f"{metrics['sessions']:,} / {metrics['sessions_completed']:,}",
        ),
        (
            "wait mean / p50 / p95 / p99 / max (min)",
            " / ".join(_fmt(w[k], 1) for k in ("mean", "p50", "p95", "p99", "max")),
        ),
        ("energy (kWh)", _fmt(metrics["energy_kwh"], 0)),
        ("revenue total (BRL)", _fmt(metrics["revenue"]["total"], 0)),
        *((f"  revenue {c}", _fmt(v, 0)) for c, v in metrics["revenue"]["per_company"].items()),
        ("utilisation mean", _fmt(u["mean"], 3)),
        (
            "balance stations Jain / CV",
            f"{_fmt(b['stations']['jain'], 3)} / {_fmt(b['stations']['cv'], 3)}",
        ),
        (
            "balance companies Jain / CV",
            f"{_fmt(b['companies']['jain'], 3)} / {_fmt(b['companies']['cv'], 3)}",
        ),
        (
            "trips started / completed",
            f"{metrics['trips']['started']:,} / {metrics['trips']['completed']:,}",
        ),
        ("stranded vehicles", _fmt(metrics["stranded"])),
        ("abandoned queues", _fmt(metrics["abandoned"])),
        ("detour mean (km)", _fmt(metrics["detour_km"]["mean"], 1)),
        (
            "queue mean / max",
            f"{_fmt(metrics['queue']['mean_len'], 2)} / {_fmt(metrics['queue']['max_len'])}",
        ),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


@app.command()
def simulate(
    scenario: ScenarioArg = None,
    policy: Annotated[
        str | None, typer.Option("--policy", "-p", help="Policy name or module:function.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the scenario's).")] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Policy parameter KEY=NUMBER (repeatable).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/<scenario>-<policy>-<seed>).")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots next to the trace.")] = True,
    booking: Annotated[
        str | None,
        typer.Option(
            help="on_arrival | trip (book whole trips first) | stop (book each stop when "
            "deciding to make it); default: the scenario's."
        ),
    ] = None,
) -> None:
    """Simulate a scenario; write trace.parquet, metrics.json and plots; print the metrics."""
    from evsim.api import simulate as run_sim

    sc = _load(scenario)
    pol = policy or sc.policy.name
    s = sc.seed if seed is None else seed
    out_dir = out or Path("runs") / f"{sc.name}-{pol}-{s}"
    with Progress(
        TextColumn("[bold]simulating[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} min"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task(f"{sc.name} / {pol} / seed {s}", total=sc.duration_min)
        try:
            res = run_sim(
                sc,
                policy=pol,
                seed=s,
                params=_parse_params(param),
                out=out_dir,
                plots=plots,
                progress=lambda t: prog.update(task, completed=t),
                booking_mode=booking,
            )
        except ValueError as err:
            _fail(str(err))
    console.print(metrics_table(res.metrics, f"{sc.name} · {pol} · seed {s}"))
    console.print(
        f"{res.trips:,} trips, {res.trace_rows:,} trace rows, {res.events:,} events in "
        f"{res.wall_s:.2f} s  ->  [bold]{out_dir}[/] (trace.parquet, metrics.json"
        + (", wait_ecdf.png, wait_hist.png, utilisation.png, queue.png)" if plots else ")")
    )


@app.command()
def compare(
    scenario: ScenarioArg = None,
    policy: Annotated[
        list[str] | None, typer.Option("--policy", "-p", help="Policy (repeat for several).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Number of seeds, the same for every policy.")] = 3,
    out: Annotated[
        Path | None, typer.Option(help="Directory for runs.parquet, summary.csv and the ECDF plot.")
    ] = None,
    booking: Annotated[
        str | None,
        typer.Option(help="Booking modes to run every policy in, e.g. on_arrival,trip."),
    ] = None,
) -> None:
    """Compare policies on the same seeds: a summary table with 95% CIs and overlaid ECDFs."""
    from evsim.api import compare as run_compare
    from evsim.plots import plot_wait_ecdf

    sc = _load(scenario)
    policies = policy or ["nearest", "least_wait", "balanced"]
    modes = [m.strip() for m in booking.split(",") if m.strip()] if booking else None
    if seeds < 1:
        _fail("--seeds must be at least 1")
    out_dir = out or Path("runs") / f"{sc.name}-compare"
    with Progress(
        TextColumn("[bold]runs[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task("", total=len(policies) * seeds * len(modes or [None]))
        try:
            res = run_compare(
                sc, policies, seeds, on_run=lambda p, s: prog.advance(task), booking_modes=modes
            )
        except ValueError as err:
            _fail(str(err))
    out_dir.mkdir(parents=True, exist_ok=True)
    res.runs.to_parquet(out_dir / "runs.parquet")
    res.summary.to_csv(out_dir / "summary.csv", index=False)
    plot_wait_ecdf(res.traces, out_dir / "wait_ecdf.png")
    t = Table(title=f"{sc.name}: {seeds} seed(s) per policy, mean ± 95% CI", header_style="bold")
    shown = [
        ("wait_min.mean", "wait mean (min)", 1),
        ("wait_min.p95", "wait p95 (min)", 1),
        ("sessions", "sessions", 0),
        ("utilisation.mean", "util", 3),
        ("balance.stations.jain", "Jain stations", 3),
        ("balance.companies.jain", "Jain companies", 3),
        ("stranded", "stranded", 1),
        ("detour_km.mean", "detour (km)", 1),
    ]
    t.add_column("policy", no_wrap=True, min_width=10)
    for _, label, _ in shown:
        t.add_column(label, justify="right")
    for _, row in res.summary.iterrows():
        cells = []
        for key, _, d in shown:
            v = row.get(key)
            ci = row.get(f"{key} ±")
            cells.append(
                _fmt(float(v), d) + (f" ± {ci:.{d}f}" if ci is not None and ci == ci else "")
            )
        t.add_row(str(row["policy"]), *cells)
    console.print(t)
    console.print(f"-> [bold]{out_dir}[/] (runs.parquet, summary.csv, wait_ecdf.png)")


@app.command()
def validate(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML file to check.")],
) -> None:
    """Check a scenario file; print what is wrong, exit 2 if anything is."""
    sc = _load(scenario)
    n_conn = sum(c.count for s in sc.stations for c in s.connectors)
    console.print(
        f"[green]ok[/] {scenario}: {len(sc.geography.cities)} cities, "
        f"{len(sc.companies)} companies, {len(sc.stations)} stations, {n_conn} connectors, "
        f"{len(sc.vehicle_models)} vehicle models, "
        f"~{sc.demand.trips:,.0f} trips over {sc.duration_min:,.0f} min, policy {sc.policy.name}"
    )


@app.command()
def policies() -> None:
    """List the built-in policies and their parameters."""
    import inspect

    from evsim.policies import POLICIES

    t = Table(header_style="bold")
    t.add_column("policy")
    t.add_column("parameters (default)")
    t.add_column("what it does")
    for name, fn in sorted(POLICIES.items()):
        sig = inspect.signature(fn)
        params = ", ".join(
            f"{p.name}={p.default}" for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY
        )
        doc = (fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        t.add_row(name, params or "-", " ".join(doc.split()))
    console.print(t)


@app.command()
def metrics(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory or trace.parquet (sim or live).")
    ],
) -> None:
    """Recompute and print metrics from a trace (works on sim and live traces)."""
    from evsim.metrics import compute_metrics
    from evsim.trace import read_trace

    try:
        df = read_trace(run_dir)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    m = compute_metrics(df)
    console.print(metrics_table(m, str(run_dir)))
    if run_dir.is_dir():
        (run_dir / "metrics.json").write_text(json.dumps(m, indent=2))


@app.command()
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories with trace.parquet (sim or live); first = reference."),
    ],
    out: Annotated[Path, typer.Option(help="Directory for report.html, report.md, figures/.")] = (
        Path("report")
    ),
    label: Annotated[
        list[str] | None, typer.Option(help="Label per run, in order (repeat; default dir name).")
    ] = None,
) -> None:
    """Compare runs side by side: wait ECDFs, utilisation, queues, balance, energy, revenue,
    and agreement of every run with the first (bootstrap CI, KS test, tolerance verdicts)."""
    from evsim.report import write_report

    with err_console.status("report") as status:
        try:
            path = write_report(
                run_dirs,
                out,
                labels=label or None,
                on_step=lambda msg: status.update(f"report: {msg}"),
            )
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
    agree_csv = path.parent / "agreement.csv"
    if agree_csv.exists():  # the agreement table, as a quick answer on the terminal
        import pandas as pd

        agree = pd.read_csv(agree_csv, keep_default_na=False, na_values=[""])
        verdicts = list(agree.columns[-3:])  # mean wait, KS, utilisation
        t = Table(title=f"agreement with {run_dirs[0]}", header_style="bold")
        for c in ("run", "Δ mean wait (min) [95% CI]", "KS D (p)", "util |Δ| max/mean (pp)"):
            t.add_column(c, justify="left" if c == "run" else "right")
        for c in verdicts:
            t.add_column(c, justify="center")
        colour = {"PASS": "[green]PASS[/]", "FAIL": "[red]FAIL[/]"}
        for _, r in agree.iterrows():
            t.add_row(
                str(r["run"]),
                f"{_fmt(r['diff (min)'])} {r['95% CI']} ({_fmt(r['diff (%)'], 1)}%)",
                f"{_fmt(r['KS D'], 3)} ({_fmt(r['KS p'], 3)})",
                f"{_fmt(r['util max |Δ| (pp)'], 1)} / {_fmt(r['util mean |Δ| (pp)'], 1)}",
                *(colour.get(str(r[c]), str(r[c])) for c in verdicts),
            )
        console.print(t)
    console.print(f"-> [bold]{path}[/] (and report.md, figures/, agreement.csv in {path.parent})")


def _param_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


@app.command()
def sweep(
    scenario: ScenarioArg = None,
    policy: Annotated[
        list[str] | None, typer.Option("--policy", "-p", help="Policy (repeat for several).")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=V1,V2,... (repeatable): a policy parameter (w_price) or a scenario field "
            "by dotted path (network.status_delay_min, charging.threshold_soc)."
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per grid point (from the scenario's).")] = 3,
    out: Annotated[
        Path | None,
        typer.Option(help="Results Parquet; runs already in it are skipped (resume)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Local worker processes (default: all cores).")
    ] = None,
    dask: Annotated[
        str | None,
        typer.Option(help="Dask scheduler address (tcp://host:8786) instead of local processes."),
    ] = None,
) -> None:
    """Run a grid of policies x parameters x seeds; one row per run with its flat metrics."""
    from evsim.api import summarise
    from evsim.sweep import parse_values, run_sweep

    sc = _load(scenario)
    grid: dict[str, list[Any]] = {}
    for item in param or []:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--param {item!r}: expected KEY=V1,V2,...")
        try:
            grid[key.strip()] = parse_values(values)
        except ValueError as err:
            _fail(f"--param {item!r}: {err}")
    if seeds < 1:
        _fail("--seeds must be at least 1")
    if workers is not None and workers < 1:
        _fail("--workers must be at least 1")
    out_path = out or Path("runs") / f"{sc.name}-sweep.parquet"
    try:
        df = run_sweep(
            sc,
            policy or [sc.policy.name],
            grid,
            seeds,
            out=out_path,
            workers=workers,
            dask=dask,
            progress=True,
        )
    except ValueError as err:
        _fail(str(err))
    keys = ["policy", *grid]
    t = Table(title=f"{sc.name}: {len(df)} run(s), mean ± 95% CI over seeds", header_style="bold")
    shown = [
        ("wait_min.mean", "wait mean (min)", 1),
        ("wait_min.p95", "wait p95 (min)", 1),
        ("balance.stations.jain", "Jain stations", 3),
        ("stranded", "stranded", 1),
    ]
    for k in keys:
        t.add_column(k, no_wrap=True)
    for _, label, _ in shown:
        t.add_column(label, justify="right")
    for _, g in df.groupby(keys, dropna=False, sort=False):
        s = summarise(g.assign(policy="x")).iloc[0]
        cells = []
        for key, _, d in shown:
            v, ci = s.get(key), s.get(f"{key} ±")
            cells.append(
                _fmt(float(v), d) + (f" ± {ci:.{d}f}" if ci is not None and ci == ci else "")
            )
        t.add_row(*(_param_cell(g.iloc[0][k]) for k in keys), *cells)
    console.print(t)
    console.print(f"-> [bold]{out_path}[/] ({len(df)} rows x {df.shape[1]} columns)")


def _load_plugins() -> None:
    for ep in entry_points(group="evsim.cli"):
        try:
            sub = ep.load()
        except ModuleNotFoundError:  # its extra is not installed (e.g. pip install evsim[live])
            continue
        except Exception as err:  # a broken plugin must not break evsim
            err_console.print(f"[yellow]warning:[/] plugin {ep.name!r} not loaded: {err}")
            continue
        if isinstance(sub, typer.Typer):
            app.add_typer(sub, name=ep.name)
        elif callable(sub):
            app.command(name=ep.name)(sub)


_load_plugins()

if __name__ == "__main__":
    app()

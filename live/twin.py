"""``evsim twin``: one scenario simulated and run live with the same seed and demand, then the
side-by-side report.

The simulated run and the live run draw the same trips (``generate_trips`` with the scenario's
seed) and use the same policy; ``--booking on_arrival`` maps to the live vehicle agent's
walk-in mode (``none``) and ``--booking trip`` to booked trips in both. The report's agreement
table says whether the live network reproduces the simulation within the tolerances of
:data:`evsim.stats.TOLERANCES` (mean wait within 10%, KS D < 0.1, per-station utilisation
within 5 points). Where they differ, the causes are real-system effects the simulation leaves
out or idealises: REST and MQTT latency, status staleness that is not a fixed delay, the
scaled clock's granularity and process scheduling on a loaded machine (see README).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

LIVE_BOOKING = {"on_arrival": "none", "trip": "trip"}


def twin(
    scenario: Annotated[Path | None, typer.Argument(help="Scenario TOML (default: Bahia).")] = None,
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Policy name.")] = None,
    time_scale: Annotated[
        float, typer.Option(help="Live run: simulated seconds per wall second.")
    ] = 120.0,
    booking: Annotated[str, typer.Option(help="on_arrival | trip (same in both runs).")] = (
        "on_arrival"
    ),
    out: Annotated[Path, typer.Option(help="Directory for sim/, live/ and report/.")] = Path(
        "runs/twin"
    ),
    warmup: Annotated[float, typer.Option(help="Live run: wall seconds before t starts.")] = 10.0,
) -> None:
    """Run SCENARIO simulated and live (same seed and demand) and write the comparison."""
    from evsim.api import simulate
    from evsim.report import write_report
    from evsim.scenario import DEFAULT_SCENARIO, ScenarioError, load_scenario
    from live.launcher import run_scenario

    if booking not in LIVE_BOOKING:
        typer.echo(f"error: --booking must be one of {sorted(LIVE_BOOKING)}", err=True)
        raise typer.Exit(2)
    if time_scale <= 0:
        typer.echo("error: --time-scale must be positive", err=True)
        raise typer.Exit(2)
    path = scenario or DEFAULT_SCENARIO
    try:
        sc = load_scenario(path)
    except ScenarioError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    pol = policy or sc.policy.name
    typer.echo(f"[1/3] simulating {sc.name} / {pol} / {booking} / seed {sc.seed}")
    try:
        simulate(sc, policy=pol, booking_mode=booking, out=out / "sim")
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    wall_min = sc.duration_min / time_scale
    typer.echo(f"[2/3] live run at x{time_scale:g} (about {wall_min:.1f} wall minutes + start)")
    run_scenario(path, out / "live", time_scale=time_scale, booking=LIVE_BOOKING[booking],
                 policy=pol, warmup_s=warmup)
    typer.echo("[3/3] report")
    html = write_report([out / "sim", out / "live"], out / "report", labels=["sim", "live"])
    agree = out / "report" / "agreement.csv"
    if agree.exists():
        with agree.open() as fh:
            for row in csv.DictReader(fh):
                typer.echo("  " + ", ".join(f"{k}={v}" for k, v in row.items() if v != ""))
    typer.echo(f"-> {html}")

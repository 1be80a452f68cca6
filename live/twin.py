"""``evsim twin``: one scenario simulated and run live with the same seed and demand, then the
side-by-side report.

The simulated run and the live run draw the same trips (``generate_trips`` with the scenario's
seed) and use the same policy; ``--booking on_arrival`` maps to the live vehicle agent's
walk-in mode (``none``), ``--booking trip`` to booked trips and ``--booking stop`` to
booked stops (the live default) in both. The report's agreement
table says whether the live network reproduces the simulation within the tolerances of
:data:`evsim.stats.TOLERANCES` (mean wait within 10%, KS D < 0.1, per-station utilisation
within 5 points). Both runs take every decision with the same code: the vehicle agent drives
with :mod:`evsim.planning` and the company servers queue walk-ins FIFO and hand out connectors
with :func:`evsim.queueing.assign_walkins`, as the simulated stations do. Where they differ,
the causes are real-system effects the simulation leaves out or idealises: REST and MQTT
latency, status staleness that is not a fixed delay, the scaled clock's granularity and
process scheduling on a loaded machine (the vehicle agent's lag behind the scaled clock is
measured and printed; see README, "Sim vs live: why they differ").

Python: :func:`run_twin` (the CLI is :func:`twin`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from live.launcher import lag_line, lag_warnings

__all__ = ["LIVE_BOOKING", "TwinResult", "lag_warnings", "run_twin", "twin"]

LIVE_BOOKING = {"on_arrival": "none", "trip": "trip", "stop": "stop"}


@dataclass
class TwinResult:
    """What :func:`run_twin` wrote: run dirs, the report and its agreement rows."""

    out: Path
    html: Path
    agreement: list[dict[str, str]] = field(default_factory=list)
    lag: dict[str, float] = field(default_factory=dict)  # vehicle agent's clock lag
    live: dict[str, Any] = field(default_factory=dict)  # run_scenario's info + metrics
    warnings: list[str] = field(default_factory=list)  # why the live run may not compare

    @property
    def sim_dir(self) -> Path:
        return self.out / "sim"

    @property
    def live_dir(self) -> Path:
        return self.out / "live"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"


def run_twin(
    scenario: str | Path | None = None,
    out: str | Path = "runs/twin",
    *,
    policy: str | None = None,
    time_scale: float = 120.0,
    booking: str = "on_arrival",
    warmup_s: float = 10.0,
    echo: Any = None,
) -> TwinResult:
    """Simulate ``scenario`` and run it live (same seed, demand and policy), then write the
    report to ``out/report``. Raises ValueError on bad arguments; needs ``mosquitto``."""
    from evsim.api import simulate
    from evsim.report import write_report
    from evsim.scenario import DEFAULT_SCENARIO, load_scenario
    from live.launcher import run_scenario

    say = echo or (lambda _msg: None)
    if booking not in LIVE_BOOKING:
        raise ValueError(f"booking must be one of {sorted(LIVE_BOOKING)}")
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    out = Path(out)
    path = Path(scenario) if scenario is not None else DEFAULT_SCENARIO
    sc = load_scenario(path)
    pol = policy or sc.policy.name
    say(f"[1/3] simulating {sc.name} / {pol} / {booking} / seed {sc.seed}")
    simulate(sc, policy=pol, booking_mode=booking, out=out / "sim")
    wall_min = sc.duration_min / time_scale
    say(f"[2/3] live run at x{time_scale:g} (about {wall_min:.1f} wall minutes + start)")
    live = run_scenario(path, out / "live", time_scale=time_scale,
                        booking=LIVE_BOOKING[booking], policy=pol, warmup_s=warmup_s)
    lag: dict[str, float] = live["info"]["vehicle_lag"]
    if lag:
        say(f"  {lag_line(lag)}")
    say("[3/3] report")
    html = write_report([out / "sim", out / "live"], out / "report", labels=["sim", "live"])
    rows: list[dict[str, str]] = []
    agree = out / "report" / "agreement.csv"
    if agree.exists():
        with agree.open() as fh:
            rows = list(csv.DictReader(fh))
    for row in rows:
        say("  " + ", ".join(f"{k}={v}" for k, v in row.items() if v != ""))
    ref = next((float(r["reference (min)"]) for r in rows if r.get("reference (min)")), None)
    warnings = lag_warnings(lag, time_scale, booking=booking, grace_min=sc.booking.grace_min,
                            mean_wait_min=ref)
    for w in warnings:
        say(f"  warning: {w}")
    say(f"-> {html}")
    return TwinResult(out, Path(html), rows, lag, live, warnings)


def twin(
    scenario: Annotated[Path | None, typer.Argument(help="Scenario TOML (default: Bahia).")] = None,
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Policy name.")] = None,
    time_scale: Annotated[
        float, typer.Option(help="Live run: simulated seconds per wall second.")
    ] = 120.0,
    booking: Annotated[str, typer.Option(help="on_arrival | trip | stop (same in both runs).")] = (
        "on_arrival"
    ),
    out: Annotated[Path, typer.Option(help="Directory for sim/, live/ and report/.")] = Path(
        "runs/twin"
    ),
    warmup: Annotated[float, typer.Option(help="Live run: wall seconds before t starts.")] = 10.0,
) -> None:
    """Run SCENARIO simulated and live (same seed and demand) and write the comparison."""
    from evsim.scenario import ScenarioError

    if booking not in LIVE_BOOKING:
        typer.echo(f"error: --booking must be one of {sorted(LIVE_BOOKING)}", err=True)
        raise typer.Exit(2)
    if time_scale <= 0:
        typer.echo("error: --time-scale must be positive", err=True)
        raise typer.Exit(2)
    try:
        run_twin(scenario, out, policy=policy, time_scale=time_scale, booking=booking,
                 warmup_s=warmup, echo=typer.echo)
    except ScenarioError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None

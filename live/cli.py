"""``evsim live ...``: run a scenario on a live network, or keep one up.

The typer app ``app`` is plugged into the ``evsim`` command through the ``evsim.cli`` entry
point group (``live = "live.cli:app"``); ``python -m live ...`` runs it directly.

* ``evsim live run [SCENARIO] --time-scale 120 --out DIR [--broker URL] [--booking trip]``:
  broker, one server and one station agent per company, the vehicle agent; runs to the end of
  the scenario, stops everything, writes ``trace.parquet``, ``metrics.json``, ``run.json`` and
  the plots to DIR.
* ``evsim live up [SCENARIO]``: the same network without an end (vehicles optional), until
  Ctrl-C; then the trace is collected like ``run``.
* ``acl --scenario S --out deploy/mosquitto``: MQTT credentials + ACL for docker-compose.
* ``server``, ``station-agent``, ``vehicle-agent``, ``broker``: the single components (what the
  launcher and the Docker Compose services run), configured by ``EVSIM_*`` variables.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="live",
    help="Run the live network: company servers, MQTT station agents, vehicle agent.",
    no_args_is_help=True,
    add_completion=False,
)

ScenarioArg = Annotated[
    Path | None, typer.Argument(help="Scenario TOML (default: the Bahia scenario).")
]
_PASS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _scenario_path(path: Path | None) -> Path:
    from evsim.scenario import DEFAULT_SCENARIO, ScenarioError, load_scenario

    p = path or DEFAULT_SCENARIO
    try:
        load_scenario(p)
    except ScenarioError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return p


@app.command()
def run(
    scenario: ScenarioArg = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/live"),
    time_scale: Annotated[float, typer.Option(help="Simulated seconds per wall second.")] = 120.0,
    broker: Annotated[str | None, typer.Option(help="Use this broker (mqtt://host:port) "
                                               "instead of starting mosquitto.")] = None,
    booking: Annotated[str, typer.Option(help="stop | trip | none")] = "stop",
    policy: Annotated[str | None, typer.Option(help="Recommendation policy.")] = None,
    max_trips: Annotated[int | None, typer.Option(help="Drive only the first N trips.")] = None,
    skip_idle: Annotated[bool, typer.Option(help="Start the clock just before the first "
                                            "departure.")] = True,
    plots: Annotated[bool, typer.Option(help="Write PNG plots.")] = True,
    warmup: Annotated[float, typer.Option(help="Wall seconds before the clock starts.")] = 10.0,
) -> None:
    """Run SCENARIO on a live network to its end and write the run directory."""
    from live.launcher import lag_line, run_scenario

    if booking not in ("stop", "trip", "none"):
        typer.echo("error: --booking must be stop, trip or none", err=True)
        raise typer.Exit(2)
    if time_scale <= 0:
        typer.echo("error: --time-scale must be positive", err=True)
        raise typer.Exit(2)
    path = _scenario_path(scenario)
    t0 = time.time()

    shown = [0.0]

    def progress(t: float) -> None:
        if time.time() - shown[0] >= 5.0:
            shown[0] = time.time()
            typer.echo(f"  t = {t:7.1f} min  ({time.time() - t0:5.1f} s wall)")

    res = run_scenario(path, out, time_scale=time_scale, broker_url=broker, booking=booking,
                       policy=policy, skip_idle=skip_idle, max_trips=max_trips, plots=plots,
                       progress=progress, warmup_s=warmup)
    m, info = res["metrics"], res["info"]
    mean = m["wait_min"]["mean"]
    typer.echo(f"\nlive run done in {info['wall_s']:.1f} s -> {out}")
    typer.echo(f"  trips {m['trips']['started']} started / {m['trips']['completed']} completed,"
               f" sessions {m['sessions']}, wait mean "
               f"{'-' if mean is None else f'{mean:.2f}'} min, stranded {m['stranded']}")
    lag = info["vehicle_lag"]
    if lag:
        typer.echo(f"  {lag_line(lag)}")
    for w in info["warnings"]:
        typer.secho(f"  warning: {w}", fg=typer.colors.YELLOW, err=True)


@app.command()
def up(
    scenario: ScenarioArg = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/live-up"),
    time_scale: Annotated[float, typer.Option()] = 60.0,
    broker: Annotated[str | None, typer.Option()] = None,
    vehicles: Annotated[bool, typer.Option(help="Also drive the scenario's trips.")] = False,
    booking: Annotated[str, typer.Option()] = "stop",
) -> None:
    """Start the network and keep it running until Ctrl-C (prints the server URLs)."""
    from live.launcher import LiveNetwork, collect_trace, vehicle_lag

    path = _scenario_path(scenario)
    net = LiveNetwork(path, out, time_scale=time_scale, broker_url=broker)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        net.start()
        typer.echo(f"broker {net.broker_url}")
        for company, url in net.servers.items():
            typer.echo(f"server {company:<12} {url}  (docs: {url}/docs)")
        if vehicles:
            net.start_vehicles(booking)
        typer.echo("running; Ctrl-C to stop")
        while not stop.wait(0.5):
            dead = [p.name for p in net.procs if not p.alive and p.name != "vehicles"]
            if dead:
                typer.echo(f"stopped: {dead} exited (see {out}/logs)", err=True)
                break
    except KeyboardInterrupt:
        pass
    finally:
        codes = net.stop()
    sc = net.scenario
    info: dict[str, object] = {
        "source": "live", "scenario": sc.name, "policy": sc.policy.name, "seed": sc.seed,
        "horizon_min": max(net.now(), 0.0), "time_scale": time_scale,
        "booking": booking if vehicles else None, "servers": net.servers,
        "broker": net.broker_url,
    }
    collect_trace(sc, net.out, info)
    info.update({"exit_codes": codes, "vehicle_lag": vehicle_lag(net.out)})
    (net.out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    typer.echo(f"stopped; trace in {net.out / 'trace.parquet'}")


@app.command()
def server(
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 8000,
    log_level: Annotated[str, typer.Option()] = "warning",
    fd: Annotated[int | None, typer.Option(
        help="serve on this inherited, already listening TCP socket instead of binding "
             "--host/--port (the launcher binds it: no other process can take the port "
             "between its choice and the bind)")] = None,
) -> None:
    """One company server (uvicorn), configured by EVSIM_* variables (EVSIM_COMPANY...)."""
    import logging
    import os
    import socket

    import uvicorn

    logging.basicConfig(level=os.environ.get("EVSIM_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config("live.server.app:app_from_env", factory=True, host=host,
                            port=port, log_level=log_level, timeout_graceful_shutdown=3)
    # socket(fileno=...) reads the family off the socket (uvicorn's own --fd assumes a Unix
    # socket, and asyncio then leaves TCP_NODELAY off every connection)
    sockets = None if fd is None else [socket.socket(fileno=fd)]
    srv = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        srv.run(sockets=sockets)
    if not srv.started:
        raise SystemExit(3)  # as uvicorn.run: the app or the socket failed at start-up


@app.command("station-agent", context_settings=_PASS, add_help_option=False)
def station_agent(ctx: typer.Context) -> None:
    """One company's station agent (options: see ``station-agent --help``)."""
    from live.station_agent import main

    raise typer.Exit(main(list(ctx.args)))


@app.command("vehicle-agent", context_settings=_PASS, add_help_option=False)
def vehicle_agent(ctx: typer.Context) -> None:
    """The vehicle agent (options: see ``vehicle-agent --help``)."""
    from live.vehicle_agent import main

    raise typer.Exit(main(list(ctx.args)))


@app.command()
def acl(
    scenario: Annotated[Path | None, typer.Option(help="Scenario TOML.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("deploy/mosquitto"),
) -> None:
    """MQTT users, passwords and ACL for SCENARIO: passwd + acl (for the broker) and
    secrets.env (mode 0600, for `docker compose --env-file`). Never commit them."""
    from evsim.scenario import load_scenario
    from live.acl import write_deploy

    creds, files = write_deploy(load_scenario(_scenario_path(scenario)), out)
    typer.echo(f"{len(creds.users())} MQTT users; wrote " + ", ".join(str(f) for f in
                                                               files.values()))


@app.command()
def broker(port: Annotated[int, typer.Option()] = 1883,
           host: Annotated[str, typer.Option()] = "127.0.0.1") -> None:
    """A local mosquitto with the lab config, until Ctrl-C."""
    from live.broker import MosquittoBroker

    with MosquittoBroker(port, host) as b:
        typer.echo(f"mosquitto on {b.url} (config {b.config_path})")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5) and b.running:
                pass
        except KeyboardInterrupt:
            pass

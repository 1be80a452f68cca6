"""Start a whole live network on one machine, run a scenario through it, collect the trace.

Topology (the same as ``docker-compose.yml``, one OS process per container):

* a Mosquitto broker (:class:`live.broker.MosquittoBroker`), unless ``broker_url`` is given;
* per company: a server (``python -m live server``: uvicorn + :func:`live.server.create_app`)
  on a free loopback port, bound by the launcher and handed over as a listening socket
  (``--fd``: no other process can take the port in between), with its own SQLite database
  ``db/{company}.db`` in the run dir,
  and a station agent (``python -m live station-agent``) for its stations;
* one vehicle agent (``python -m live vehicle-agent``) driving the scenario's trips.

Every process gets the same ``EVSIM_EPOCH`` (Unix time of ``start_min``) and time scale, so
they share one scenario clock. Each runs in its own process group with its output in
``logs/{name}.log``; :meth:`LiveNetwork.stop` sends SIGTERM to every group, then SIGKILL to
what is left after a grace period, so nothing outlives the run (also on Ctrl-C or an error).

Faults (:mod:`live.faults`): with ``faults=True`` every server watches a fault file
``faults/{company}`` in the run dir; :meth:`LiveNetwork.arm` writes a spec there (crash,
pause or cut the server at a protocol step), :meth:`LiveNetwork.fired` tells whether it fired,
:meth:`LiveNetwork.kill` / :meth:`LiveNetwork.restart` / :meth:`LiveNetwork.pause` /
:meth:`LiveNetwork.resume` act on a process from outside (SIGKILL, SIGSTOP, SIGCONT).

After the run :func:`collect_trace` merges the trace rows of every company database and the
vehicle agent's JSON-lines part into ``trace.parquet`` (evsim.trace schema, run info
``source: "live"``), adding the ``connector_status`` rows at t=0 the simulation also writes;
``metrics.json`` and the PNG plots come from :mod:`evsim.metrics` / :mod:`evsim.plots`, so a
live run is read exactly like a simulated one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from evsim.scenario import Scenario, load_scenario
from live.acl import Credentials, acl_lines, write_secrets
from live.broker import MosquittoBroker

__all__ = ["LiveNetwork", "Proc", "collect_trace", "run_scenario"]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LiveNetwork:
    """Processes of one live run. Use as a context manager so everything is stopped."""

    scenario_path: Path
    out: Path
    time_scale: float = 120.0
    broker_url: str | None = None
    policy: str | None = None
    start_min: float = 0.0
    mqtt_user: str | None = None
    mqtt_password: str | None = None
    python: str = sys.executable
    faults: bool = False  # servers watch faults/{company} (live.faults)
    epoch: float = 0.0
    broker: MosquittoBroker | None = None
    auth: bool = True  # [access] own broker: per-run credentials + ACL, no anonymous clients
    creds: Credentials | None = None
    procs: list[Proc] = field(default_factory=list)
    servers: dict[str, str] = field(default_factory=dict)  # company -> base URL

    def __post_init__(self) -> None:
        self.scenario_path = Path(self.scenario_path).resolve()
        self.scenario: Scenario = load_scenario(self.scenario_path)
        self.out = Path(self.out).resolve()
        for d in ("db", "logs", "parts", "faults"):
            (self.out / d).mkdir(parents=True, exist_ok=True)

    # -- environment ---------------------------------------------------------------------

    @property
    def mqtt_url(self) -> str:
        assert self.broker_url is not None
        return self.broker_url

    def env(self, **extra: str) -> dict[str, str]:
        e = dict(os.environ)
        e.update({
            "EVSIM_SCENARIO": str(self.scenario_path),
            "EVSIM_MQTT_URL": self.mqtt_url,
            "EVSIM_TIME_SCALE": repr(self.time_scale),
            "EVSIM_START_MIN": repr(self.start_min),
            "EVSIM_EPOCH": repr(self.epoch),
            "EVSIM_TRACE_DIR": str(self.out / "parts"),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *[p for p in [e.get("PYTHONPATH")] if p]]
            ),
            "PYTHONUNBUFFERED": "1",
            # protocol timers: about half a scenario minute, within [20 ms, 200 ms] wall
            "EVSIM_TICK_S": repr(min(max(30.0 / self.time_scale, 0.02), 0.2)),
        })
        if self.policy:
            e["EVSIM_POLICY"] = self.policy
        if self.mqtt_user:
            e["EVSIM_MQTT_USER"] = self.mqtt_user
        if self.mqtt_password:
            e["EVSIM_MQTT_PASSWORD"] = self.mqtt_password
        e.update(extra)
        return e

    def auth_env(self, name: str) -> dict[str, str]:
        """[access] MQTT credentials of process ``name`` (server-c / stations-c / vehicles)."""
        if self.creds is None:
            return {}
        role, _, company = name.partition("-")
        if role == "server":
            return self.creds.server_env(company)
        if role == "stations":
            return self.creds.station_agent_env(company)
        return self.creds.vehicles_env() if name == "vehicles" else {}

    def spawn(self, name: str, args: list[str], *, pass_fds: tuple[int, ...] = (),
              **env: str) -> Proc:
        env = {**self.auth_env(name), **env}  # [access]
        log_path = self.out / "logs" / f"{name}.log"
        fh = log_path.open("ab")
        try:
            p = subprocess.Popen(
                [self.python, "-m", "live", *args], env=self.env(**env), cwd=str(self.out),
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() signals the whole group
                pass_fds=pass_fds,
            )
        finally:
            fh.close()
        proc = Proc(name, p, log_path)
        self.procs.append(proc)
        return proc

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, ready_timeout: float = 60.0, *, wait: bool = True) -> LiveNetwork:
        """Broker, then servers and station agents; returns once every server is healthy
        (``wait=False``: at once; :meth:`wait_healthy` then waits)."""
        if self.broker_url is None:
            users, acl = None, None
            if self.auth:  # [access] random per run; secrets.env is 0600 in the run dir
                self.creds = Credentials.generate(self.scenario)
                write_secrets(self.creds, self.out / "broker" / "secrets.env")
                users, acl = self.creds.users(), acl_lines(self.scenario)
            self.broker = MosquittoBroker(workdir=self.out / "broker", users=users,
                                          acl=acl).start()
            self.broker_url = self.broker.url
        if not self.epoch:
            self.epoch = time.time()
        for c in self.scenario.companies:
            self.spawn_server(c.id)
        for c in self.scenario.companies:
            if any(s.company == c.id for s in self.scenario.stations):
                self.spawn(f"stations-{c.id}", ["station-agent"], EVSIM_COMPANY=c.id)
        if wait:
            self.wait_healthy(ready_timeout)
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = dict(self.servers)
        while pending:
            for proc in self.procs:
                if not proc.alive:
                    raise RuntimeError(f"{proc.name} exited early:\n{tail(proc.log_path)}")
            for company, url in list(pending.items()):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                        del pending[company]
            if time.monotonic() > deadline:
                raise TimeoutError(f"servers not healthy after {timeout}s: {sorted(pending)}")
            if pending:
                time.sleep(0.1)

    def start_vehicles(self, booking: str = "stop", until_min: float | None = None,
                       max_trips: int | None = None) -> Proc:
        args = ["vehicle-agent", "--booking", booking,
                "--trace", str(self.out / "parts" / "vehicles.jsonl")]
        for company, url in self.servers.items():
            args += ["--server", f"{company}={url}"]
        if until_min is not None:
            args += ["--until-min", repr(until_min)]
        if max_trips is not None:
            args += ["--max-trips", str(max_trips)]
        return self.spawn("vehicles", args)

    def now(self) -> float:
        return self.start_min + (time.time() - self.epoch) * self.time_scale / 60.0

    def spawn_server(self, company: str) -> Proc:
        """Start ``company``'s server on a listening socket bound here and handed over
        (``server --fd``), on its port so far or else a free one: a port picked free and
        bound later by the child could be taken in between by any other process."""
        url = self.servers.get(company)
        port = int(url.rsplit(":", 1)[1]) if url else 0
        with listening_socket(port) as sock:
            port = sock.getsockname()[1]
            self.servers[company] = f"http://127.0.0.1:{port}"
            return self.spawn(f"server-{company}",
                              ["server", "--fd", str(sock.fileno()), "--port", str(port)],
                              pass_fds=(sock.fileno(),), **self._server_env(company))

    def restart(self, name: str) -> Proc:
        """Kill one process (SIGKILL, a crash) and start it again with the same arguments
        (a server on the same port)."""
        old = next(p for p in self.procs if p.name == name)
        _signal_group(old.popen, signal.SIGKILL)
        old.popen.wait(10)
        self.procs.remove(old)
        company = name.split("-", 1)[1]
        if name.startswith("server-"):
            return self.spawn_server(company)
        args = cast("list[str]", old.popen.args)[3:]  # after "python -m live"
        return self.spawn(name, args, EVSIM_COMPANY=company)

    def _server_env(self, company: str) -> dict[str, str]:
        env = {"EVSIM_COMPANY": company,
               "EVSIM_DB_URL": f"sqlite:///{self.db_path(company)}"}
        if self.faults:
            env["EVSIM_FAULT_FILE"] = str(self.fault_file(company))
        return env

    # -- faults (live.faults) ------------------------------------------------------------

    def db_path(self, company: str) -> Path:
        return self.out / "db" / f"{company}.db"

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def fault_file(self, company: str) -> Path:
        return self.out / "faults" / company

    def arm(self, company: str, spec: str) -> None:
        """Arm ``company``'s server with a fault spec (replaces the previous one)."""
        path = self.fault_file(company)
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + ".fired").unlink()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(spec + "\n")
        os.replace(tmp, path)  # a new inode: the server sees the change at its next step

    def disarm(self, company: str) -> None:
        """Remove the fault spec (heals an injected partition)."""
        with contextlib.suppress(FileNotFoundError):
            self.fault_file(company).unlink()

    def fired(self, company: str) -> dict[str, Any] | None:
        """What the last armed spec did (``{spec, pid, t}``) once it fired, else None."""
        path = self.fault_file(company)
        try:
            return dict(json.loads(path.with_name(path.name + ".fired").read_text()))
        except (OSError, ValueError):
            return None

    def kill(self, name: str) -> None:
        """SIGKILL a process group (it stays dead until :meth:`restart`)."""
        p = self.proc(name)
        _signal_group(p.popen, signal.SIGKILL)
        p.popen.wait(10)

    def pause(self, name: str) -> None:
        """SIGSTOP a process group (frozen: no timers, no I/O; the broker keeps its socket)."""
        _signal_group(self.proc(name).popen, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        _signal_group(self.proc(name).popen, signal.SIGCONT)

    def stopped(self, name: str) -> bool:
        """True if the process is stopped (SIGSTOP, e.g. by an injected ``pause``)."""
        try:
            stat = Path(f"/proc/{self.proc(name).popen.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] in ("T", "t")

    def stop(self, grace_s: float = 5.0) -> dict[str, int | None]:
        """SIGTERM every process group, SIGKILL after ``grace_s``; then the broker."""
        for p in self.procs:
            if p.alive:
                _signal_group(p.popen, signal.SIGCONT)  # a paused process cannot exit
                _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(deadline - time.monotonic(), 0.05))
        codes: dict[str, int | None] = {}
        for p in self.procs:
            _signal_group(p.popen, signal.SIGKILL)  # stragglers and any children they left
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)
            codes[p.name] = p.popen.returncode
        if self.broker is not None:
            self.broker.stop()
        return codes

    def __enter__(self) -> LiveNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def listening_socket(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on ``host:port`` (0: a free port) for a child process to
    serve on (``python -m live server --fd``); the caller closes its own copy."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart, same port
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


# -- trace ----------------------------------------------------------------------------------


def _db_rows(db: Path) -> list[dict[str, Any]]:
    from live.storage import Storage

    st = Storage(f"sqlite:///{db}")
    try:
        out: list[dict[str, Any]] = []
        seq = 0
        while True:
            page = st.trace_rows(after_seq=seq, limit=10_000)
            if not page:
                return out
            seq = page[-1]["seq"]
            out.extend({k: v for k, v in r.items() if k != "seq"} for r in page)
    finally:
        st.close()


def _jsonl_rows(path: Path) -> Iterable[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                yield json.loads(line)


def collect_trace(scenario: Scenario, out: Path, run_info: dict[str, Any]) -> Path:
    """Merge every part of a run dir into ``out/trace.parquet``; returns its path."""
    from evsim.model.world import World
    from evsim.trace import COLUMNS, TraceWriter

    names = {n for n, _ in COLUMNS}
    rows: list[dict[str, Any]] = []
    for db in sorted((out / "db").glob("*.db")):
        rows.extend(_db_rows(db))
    for part in sorted((out / "parts").glob("*.jsonl")):
        rows.extend(_jsonl_rows(part))
    world = World.build(scenario)
    have = {r.get("connector_id") for r in rows if r.get("kind") == "connector_status"
            and r.get("t_min", 1) <= 0}
    for i, sid in enumerate(world.stations.ids):
        for spec in world.connectors[i]:
            if spec.connector_id not in have:
                rows.append({"t_min": 0.0, "kind": "connector_status", "station_id": sid,
                             "company_id": world.stations.company_ids[i],
                             "connector_id": spec.connector_id, "power_kw": spec.power_kw,
                             "status": "Available", "detail": spec.type})
    # the horizon cuts the run as it cuts the simulation (SimPy's ``run(until=...)`` does not
    # process events at or after it): servers and stations keep reporting until stopped
    horizon = float(run_info.get("horizon_min") or math.inf)
    rows = [r for r in rows if isinstance(r.get("t_min"), int | float)
            and math.isfinite(r["t_min"]) and r["t_min"] < horizon and r.get("kind")]
    rows.sort(key=lambda r: r["t_min"])
    # one arrive / session_start / session_end per session: keep the earliest report
    seen: set[tuple[str, str]] = set()
    merged = []
    for r in rows:
        if r["kind"] in ("arrive", "session_start", "session_end") and r.get("session_id"):
            key = (r["kind"], r["session_id"])
            if key in seen:
                continue
            seen.add(key)
        merged.append({k: v for k, v in r.items() if k in names})
    path = out / "trace.parquet"
    with TraceWriter(path, run_info=run_info) as tw:
        tw.extend(merged)
    return path


def write_report(out: Path, horizon_min: float, label: str, plots: bool = True) -> dict[str, Any]:
    from evsim.metrics import compute_metrics, write_metrics
    from evsim.trace import read_trace

    df = read_trace(out)
    metrics = compute_metrics(df, horizon_min=horizon_min)
    write_metrics(metrics, out / "metrics.json")
    if plots:
        from evsim.plots import write_plots

        write_plots(df, out, label=label)
    return metrics


def first_departure(scenario: Scenario, seed: int) -> float:
    from evsim.model.demand import generate_trips
    from evsim.model.world import World

    t = generate_trips(World.build(scenario), seed).depart_t_min
    return float(t[0]) if len(t) else 0.0


def vehicle_lag(out: Path) -> dict[str, float]:
    """The vehicle agent's lag behind the scaled clock in run dir ``out`` (what it wrote on
    exit, :meth:`live.vehicle_agent.Fleet.lag_summary`), or {} if it wrote none."""
    path = out / "parts" / "vehicle_lag.json"
    return json.loads(path.read_text()) if path.exists() else {}


def lag_line(lag: dict[str, float]) -> str:
    """``lag`` (:func:`vehicle_lag`) in one line, for a run's summary."""
    return (f"vehicle agent behind the scaled clock: mean {lag['mean_s'] * 1000:.0f} ms "
            f"({lag['mean_min']:.2f} scenario min), p99 {lag['p99_s'] * 1000:.0f} ms "
            f"({lag['p99_min']:.2f} min), max {lag['max_s'] * 1000:.0f} ms")


def lag_warnings(
    lag: dict[str, float], time_scale: float, *, booking: str, grace_min: float,
    mean_wait_min: float | None = None, wait_rel: float = 0.10, wait_of: str = "the reference",
) -> list[str]:
    """Why a live run's clock lag may spoil its results, or a comparison with the
    simulation (empty: it kept up).

    ``lag``: the vehicle agent's lateness behind the scaled clock (``mean_s``, ``p99_s``,
    ``max_s``, in wall seconds); a vehicle that acts late arrives late. In the booked modes,
    one later than ``grace_min`` after its window opened finds its reservation gone
    (NO_SHOW), which the simulation never sees; and a mean lateness above the tolerance on
    the mean wait (``wait_rel`` x ``mean_wait_min``: the simulation's for a twin, the run's
    own for a live run alone, ``wait_of`` names which) moves arrivals, on average, by more
    than the difference a comparison looks for."""
    if not lag:
        return []
    out: list[str] = []
    scale = time_scale / 60.0  # scenario minutes per wall second
    max_min, mean_min = lag.get("max_s", 0.0) * scale, lag.get("mean_s", 0.0) * scale
    advice = "; run it again on a quieter machine or at a lower --time-scale"
    if booking in ("trip", "stop") and max_min > grace_min:
        out.append(f"the vehicle agent fell up to {max_min:.1f} scenario min behind the clock, "
                   f"more than booking.grace_min ({grace_min:g}): late vehicles lost their "
                   f"reservations (NO_SHOW), which the simulation never does{advice}")
    if mean_wait_min is not None and mean_min > wait_rel * mean_wait_min:
        out.append(f"the vehicle agent's actions were {mean_min:.2f} scenario min late on "
                   f"average, over {wait_rel:.0%} of {wait_of} mean wait "
                   f"({mean_wait_min:.2f} min): timing noise of the size of the tolerance"
                   f"{advice}")
    return out


def run_scenario(
    scenario_path: str | Path,
    out: str | Path,
    *,
    time_scale: float = 120.0,
    broker_url: str | None = None,
    booking: str = "stop",
    policy: str | None = None,
    skip_idle: bool = True,
    max_trips: int | None = None,
    plots: bool = True,
    progress: Callable[[float], None] | None = None,
    warmup_s: float = 10.0,
) -> dict[str, Any]:
    """Run a scenario on a live network to its end; returns run info + metrics.

    The scenario clock starts ``warmup_s`` wall seconds after launch (processes import numpy,
    scipy, FastAPI... first); with ``skip_idle`` it starts 5 minutes before the first trip.
    The run info (also ``run.json``) has the vehicle agent's lag behind the scaled clock
    (``vehicle_lag``: wall seconds and scenario minutes) and ``warnings``, from
    :func:`lag_warnings`, where that lag spoiled the run (a machine too slow or too busy
    for the time scale).
    """
    t0 = time.time()
    out = Path(out)
    sc = load_scenario(scenario_path)
    start = max(math.floor(first_departure(sc, sc.seed)) - 5.0, 0.0) if skip_idle else 0.0
    net = LiveNetwork(Path(scenario_path), out, time_scale=time_scale, broker_url=broker_url,
                      policy=policy, start_min=start)
    codes: dict[str, int | None] = {}
    try:
        # the shared clock starts at start_min once the processes are (very likely) up; a
        # slow start only eats into the first minutes before the first departure
        net.epoch = time.time() + warmup_s
        # every process starts at once: the vehicle agent's start-up (imports, the fleet's
        # plans: seconds on a loaded machine) overlaps the servers' instead of following it
        # and running its first trips late (it waits for the servers' /health itself)
        net.start(wait=False)
        veh = net.start_vehicles(booking, until_min=sc.duration_min, max_trips=max_trips)
        net.wait_healthy()
        if time.time() > net.epoch:
            log.warning("live network took %.1f s to start (warmup_s=%.1f): the clock was "
                        "already running", time.time() - net.epoch + warmup_s, warmup_s)
        end_wall = net.epoch + (sc.duration_min - start) * 60.0 / time_scale
        while veh.alive and time.time() < end_wall + 30.0:
            time.sleep(0.2)
            if progress is not None:
                progress(min(net.now(), sc.duration_min))
            dead = [p.name for p in net.procs if not p.alive and p is not veh]
            if dead:
                raise RuntimeError(f"{dead} died:\n" + "\n".join(
                    tail(p.log_path) for p in net.procs if p.name in dead))
    finally:
        codes = net.stop()
    info = {
        "source": "live", "scenario": sc.name, "policy": policy or sc.policy.name,
        "seed": sc.seed, "horizon_min": sc.duration_min, "start_min": start,
        "time_scale": time_scale, "booking": booking, "servers": net.servers,
        "broker": net.broker_url,
    }
    collect_trace(sc, out, info)
    metrics = write_report(out, sc.duration_min, f"live {info['policy']}", plots=plots)
    lag = vehicle_lag(out)
    mean_wait = metrics.get("wait_min", {}).get("mean")
    warnings = lag_warnings(lag, time_scale, booking=booking, grace_min=sc.booking.grace_min,
                            mean_wait_min=mean_wait if mean_wait == mean_wait else None,
                            wait_of="this run's")
    for w in warnings:
        log.warning("%s", w)
    info.update({"wall_s": time.time() - t0, "exit_codes": codes, "vehicle_lag": lag,
                 "warnings": warnings})
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return {"info": info, "metrics": metrics}

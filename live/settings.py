"""Settings of one live company server / agent, read from the environment.

pydantic-settings is not a dependency, so this is a frozen pydantic model with
an explicit :meth:`Settings.from_env`.  Environment variables:

==========================  ====================================  ===========================
variable                    default                               meaning
==========================  ====================================  ===========================
``EVSIM_COMPANY``           (required for a server)               company id in the scenario
``EVSIM_SCENARIO``          ``data/bahia.toml`` (evsim default)   scenario TOML path
``EVSIM_DB_URL``            ``sqlite:///./evsim-{company}.db``    SQLAlchemy URL (sqlite/postgres)
``EVSIM_MQTT_URL``          ``mqtt://127.0.0.1:1883``             broker (mqtt:// or mqtts://)
``EVSIM_MQTT_USER``         unset                                 broker user name
``EVSIM_MQTT_PASSWORD``     unset                                 broker password
``EVSIM_MQTT_STATION_KEY``  unset                                 station agent: per-station
                                                                  passwords (live.acl)
``EVSIM_MQTT_KEEPALIVE``    ``10``                                MQTT keep-alive (s); a
                                                                  silent station is offline
                                                                  after 1.5 x this
``EVSIM_OUTAGE_MIN``        ``15``                                scenario min an offline
                                                                  station is assumed to stay
                                                                  down: reservations due
                                                                  sooner are cancelled
``EVSIM_OUTAGE_SOC``        scenario's ``charging.threshold_soc``  SoC of the vehicle model
                                                                  alternatives are ranked for
``EVSIM_TIME_SCALE``        ``60``                                sim seconds per wall second
``EVSIM_START_MIN``         ``0``                                 scenario minute at the epoch
``EVSIM_EPOCH``             process start                         unix time (s) of ``start_min``
``EVSIM_POLICY``            scenario's ``policy.name``            policy name for recommendations
``EVSIM_TRACE_DIR``         unset                                 where launchers dump traces
``EVSIM_TICK_S``            ``0.2``                               protocol tick period (wall s)
``EVSIM_BOOKING_WAIT_S``    ``5``                                 max wall wait in POST /bookings
==========================  ====================================  ===========================

Time: **one wall-clock second is ``time_scale`` simulated seconds**, i.e.
``t_min = start_min + (unix_time - epoch) * time_scale / 60``.  ``time_scale=60``
(default) runs one scenario minute per wall second; ``1`` is real time.  Give every process
of a run the same ``EVSIM_EPOCH`` (the launcher does) so that all companies share one
scenario clock and a restarted server continues it instead of starting over.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evsim.scenario import DEFAULT_SCENARIO


class Settings(BaseModel):
    """Immutable configuration (build with :meth:`from_env` or directly in tests)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    company: str = Field(default="", description="company id served by this process")
    scenario: Path = Field(default=DEFAULT_SCENARIO)
    db_url: str = Field(default="", description="SQLAlchemy URL; '' = per-company SQLite file")
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_user: str | None = None
    mqtt_password: str | None = None
    mqtt_station_key: str | None = None
    mqtt_keepalive: int = Field(default=10, ge=1, le=65535)
    outage_min: float = Field(default=15.0, ge=0, description="assumed station outage")
    outage_soc: float | None = Field(default=None, ge=0, le=1,
                                     description="SoC alternatives are ranked for")
    time_scale: float = Field(default=60.0, gt=0, description="sim seconds per wall second")
    start_min: float = Field(default=0.0, ge=0)
    epoch: float | None = Field(default=None, description="unix time of start_min")
    policy: str | None = Field(default=None, description="None = the scenario's policy")
    trace_dir: Path | None = None
    tick_s: float = Field(default=0.2, gt=0)
    booking_wait_s: float = Field(default=5.0, ge=0)
    reconcile_s: float = Field(default=10.0, ge=0, description="wall seconds between session "
                               "reconciliations of one station (live.server.reconcile)")
    otel: bool = Field(default=False, description="FastAPI's native OpenTelemetry (spans, "
                       "metrics, logs to the global providers); off by default: where it is on "
                       "it looks the providers up on every request")

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///./evsim-{self.company or 'default'}.db"

    def sim_minutes(self, wall_elapsed_s: float) -> float:
        """Scenario minutes after ``wall_elapsed_s`` wall seconds."""
        return self.start_min + wall_elapsed_s * self.time_scale / 60.0

    def wall_clock(self) -> Callable[[], float]:
        """A clock returning scenario minutes (anchored at ``epoch`` or now)."""
        epoch = self.epoch if self.epoch is not None else time.time()
        return lambda: self.sim_minutes(time.time() - epoch)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``EVSIM_*`` variables (``env`` defaults to ``os.environ``)."""
        e = os.environ if env is None else env

        def get(name: str) -> str | None:
            v = e.get(f"EVSIM_{name}")
            return v if v not in (None, "") else None

        data: dict[str, Any] = {}
        for field, var in [
            ("company", "COMPANY"),
            ("scenario", "SCENARIO"),
            ("db_url", "DB_URL"),
            ("mqtt_url", "MQTT_URL"),
            ("mqtt_user", "MQTT_USER"),
            ("mqtt_password", "MQTT_PASSWORD"),
            ("mqtt_station_key", "MQTT_STATION_KEY"),
            ("mqtt_keepalive", "MQTT_KEEPALIVE"),
            ("outage_min", "OUTAGE_MIN"),
            ("outage_soc", "OUTAGE_SOC"),
            ("time_scale", "TIME_SCALE"),
            ("start_min", "START_MIN"),
            ("epoch", "EPOCH"),
            ("policy", "POLICY"),
            ("trace_dir", "TRACE_DIR"),
            ("tick_s", "TICK_S"),
            ("booking_wait_s", "BOOKING_WAIT_S"),
            ("reconcile_s", "RECONCILE_S"),
            ("otel", "OTEL"),
        ]:
            v = get(var)
            if v is not None:
                data[field] = v
        data.update(overrides)
        return cls(**data)

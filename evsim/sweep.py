"""Parameter sweeps: every (policy, parameter combination, seed) of a grid, one row per run.

``run_sweep`` expands the grid, runs the simulations on a local process pool (or one-by-one
with ``workers=1``, or on a Dask distributed cluster with ``dask="tcp://host:8786"`` or a
``distributed.Client``) and returns a tidy table: ``run_key``, ``scenario``, ``policy``,
``seed``, one column per swept parameter, then the flat metrics of
:func:`evsim.metrics.metrics_frame` (``wait_min.mean``, ``utilisation.per_station.S1``, ...).

Parameters
----------
A key without a dot is a policy parameter (``w_price``); it applies to the policies that
accept it and is left empty (and not expanded) for the others. A dotted key is a scenario
field (``network.status_delay_min``, ``charging.threshold_soc``, ``booking.mode``); it is set
on ``Scenario.model_dump()`` and re-validated with ``Scenario.model_validate``, so an unknown
key or a bad value is a ``ValueError`` naming the key before anything runs.

Resuming
--------
With ``out``, rows already in that Parquet file whose ``run_key`` (scenario fingerprint,
policy, seed and parameter values) matches a grid point are not run again, and the file is
rewritten atomically (temporary file + ``os.replace``) after every ``chunk`` completed runs, so
an interrupted sweep loses at most one chunk. Rows of other grids in the file are kept.

Runs are deterministic: a row depends only on its key, whichever executor ran it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from evsim.scenario import Scenario

__all__ = ["RunSpec", "expand_grid", "parse_values", "run_one", "run_sweep"]

ID_COLUMNS = ("run_key", "scenario", "policy", "seed")


@dataclass(frozen=True)
class RunSpec:
    """One grid point: what :func:`run_one` needs besides the base scenario."""

    index: int  # position in the grid (output order)
    key: str
    policy: str
    seed: int
    policy_params: tuple[tuple[str, float], ...]  # swept policy parameters that apply
    scenario_params: tuple[tuple[str, Any], ...]  # validated dotted-path values
    columns: tuple[tuple[str, Any], ...]  # every swept parameter (None where it does not apply)


def parse_values(text: str) -> list[Any]:
    """``"1,2.5,trip"`` -> ``[1, 2.5, 'trip']``: ints, floats, true/false, else strings."""
    out: list[Any] = []
    for raw in text.split(","):
        v = raw.strip()
        if not v:
            raise ValueError(f"empty value in {text!r}")
        low = v.lower()
        if low in {"true", "false"}:
            out.append(low == "true")
            continue
        try:
            out.append(int(v))
            continue
        except ValueError:
            pass
        try:
            out.append(float(v))
        except ValueError:
            out.append(v)
    return out


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------


def _fingerprint(data: Mapping[str, Any]) -> str:
    raw = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted path (dict keys, list indices) in a model_dump; KeyError if absent."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                raise KeyError(".".join(parts[: i + 1]))
            if last:
                node[part] = value
            else:
                node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(".".join(parts[: i + 1]))
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            raise KeyError(".".join(parts[: i + 1]))


def _get_path(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> Scenario:
    """The scenario ``base`` (a model_dump) with dotted-path ``params`` set, validated."""
    import copy

    from pydantic import ValidationError

    from evsim.scenario import _format_errors

    data = copy.deepcopy(dict(base))
    for key, value in params.items():
        try:
            _set_path(data, key, value)
        except KeyError as err:
            raise ValueError(
                f"--param {key}: unknown scenario key {err.args[0]!r} (check the spelling)"
            ) from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(_format_errors(err))
        names = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ValueError(f"--param {names}: {problems}") from None


def _policy_accepts(policy: str) -> tuple[set[str], bool]:
    import inspect

    from evsim.policies import POLICIES, resolve

    resolve(policy)  # raises ValueError for an unknown policy
    if ":" in policy:
        import importlib

        mod, _, fn = policy.partition(":")
        func = getattr(importlib.import_module(mod), fn)
    else:
        func = POLICIES[policy]
    sig = inspect.signature(func)
    any_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = {
        p.name
        for p in sig.parameters.values()
        if p.kind is p.KEYWORD_ONLY
        or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in {"request", "snapshot", "now"})
    }
    return names, any_kw


def _run_key(fingerprint: str, policy: str, seed: int, params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if v is not None}
    return json.dumps(
        {"scenario": fingerprint, "policy": policy, "seed": seed, "params": shown},
        sort_keys=True,
        default=str,
    )


def expand_grid(
    scenario: Scenario,
    policies: Sequence[str],
    params: Mapping[str, Sequence[Any]] | None,
    seeds: int | Sequence[int],
) -> list[RunSpec]:
    """Every (policy, parameter combination, seed), validated; ValueError names a bad key."""
    params = dict(params or {})
    if not policies:
        raise ValueError("no policy to sweep")
    seed_list = (
        list(range(scenario.seed, scenario.seed + seeds)) if isinstance(seeds, int) else seeds
    )
    seed_list = [int(s) for s in seed_list]
    if not seed_list:
        raise ValueError("no seed to sweep")
    for key, values in params.items():
        if not key:
            raise ValueError("empty --param key")
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"--param {key}: give a non-empty list of values")
    scen_keys = [k for k in params if "." in k]
    pol_keys = [k for k in params if "." not in k]
    accepts = {p: _policy_accepts(p) for p in dict.fromkeys(policies)}
    for k in pol_keys:
        if not any(k in names or any_kw for names, any_kw in accepts.values()):
            known = sorted(set().union(*(n for n, _ in accepts.values())))
            raise ValueError(
                f"--param {k}: not a parameter of {', '.join(accepts)} (known: {known}); "
                "scenario fields take a dotted path such as network.status_delay_min"
            )
        for v in params[k]:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"--param {k}: policy parameters are numbers (got {v!r})")

    base = scenario.model_dump()
    fp = _fingerprint(base)
    # validate every scenario combination once, and read back the validated values
    scen_combos: list[tuple[tuple[str, Any], ...]] = []
    for combo in itertools.product(*(params[k] for k in scen_keys)):
        changes = dict(zip(scen_keys, combo, strict=True))
        validated = apply_params(base, changes).model_dump()
        scen_combos.append(tuple((k, _get_path(validated, k)) for k in scen_keys))

    specs: list[RunSpec] = []
    seen: set[str] = set()
    for pol in accepts:
        names, any_kw = accepts[pol]
        applies = [k for k in pol_keys if k in names or any_kw]
        pol_combos = itertools.product(*(params[k] for k in applies))
        for pc, sc_vals in itertools.product(list(pol_combos), scen_combos):
            pvals = tuple((k, float(v)) for k, v in zip(applies, pc, strict=True))
            cols: dict[str, Any] = {k: None for k in params}
            cols.update(dict(pvals))
            cols.update(dict(sc_vals))
            for s in seed_list:
                key = _run_key(fp, pol, s, cols)
                if key in seen:
                    continue
                seen.add(key)
                specs.append(RunSpec(len(specs), key, pol, s, pvals, sc_vals, tuple(cols.items())))
    return specs


# --------------------------------------------------------------------------------------------
# one run (executed in worker processes or on Dask workers)
# --------------------------------------------------------------------------------------------


def run_one(base: Mapping[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Simulate one grid point in memory and return its row (ids, parameters, flat metrics)."""
    from evsim.api import simulate
    from evsim.metrics import metrics_frame

    sc = apply_params(base, dict(spec.scenario_params))
    pol_params: dict[str, float] | None = None
    if spec.policy_params:
        pol_params = dict(sc.policy.params) if spec.policy == sc.policy.name else {}
        pol_params.update(dict(spec.policy_params))
    res = simulate(sc, policy=spec.policy, seed=spec.seed, params=pol_params, plots=False)
    row: dict[str, Any] = {
        "run_key": spec.key,
        "scenario": sc.name,
        "policy": spec.policy,
        "seed": spec.seed,
    }
    row.update(dict(spec.columns))
    for k, v in metrics_frame(res.metrics).iloc[0].items():
        row[str(k)] = v
    return row


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


# --------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------


def _mp_context() -> Any:
    """``fork`` when this process has no other thread (cheapest start, and safe then),
    else a fork server with evsim preloaded (fast too, and safe with threads), else spawn."""
    import multiprocessing as mp
    import threading

    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return mp.get_context("fork")
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["evsim.sweep", "evsim.api"])
        return ctx
    return mp.get_context("spawn")


Rows = Generator[dict[str, Any], None, None]  # closing one shuts its runs down


def _local(base: dict[str, Any], specs: list[RunSpec], workers: int) -> Rows:
    """Rows as runs complete. The pool (if any) is started here, before the caller starts
    its progress-bar thread; closing the iterator shuts it down."""
    if workers <= 1 or len(specs) <= 1:
        return (run_one(base, spec) for spec in specs)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=_mp_context())
    futures: list[Future[dict[str, Any]]] = [pool.submit(run_one, base, s) for s in specs]

    def results() -> Rows:
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return results()


def _dask(base: dict[str, Any], specs: list[RunSpec], dask: Any) -> Rows:
    from distributed import Client, as_completed

    own = not isinstance(dask, Client)
    client = Client(dask) if own else dask
    try:
        # keys unique to this sweep: a cluster may still be releasing an earlier sweep's
        # identical keys (same scenario, same runs), and reusing them loses the data
        token = uuid.uuid4().hex[:8]
        [base_f] = client.scatter([base], broadcast=True, hash=False)
        futures = [
            client.submit(
                run_one, base_f, s, key=f"evsim-run-{_fingerprint({'k': s.key})}-{token}"
            )
            for s in specs
        ]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.cancel(futures)
    finally:
        if own:
            client.close()


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame([{k: _clean(v) for k, v in r.items()} for r in rows])
    for col in df.columns:  # all-number object columns (None + floats) -> float
        if df[col].dtype == object:
            vals = df[col].dropna()
            if len(vals) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in vals
            ):
                df[col] = df[col].astype(float)
    return df


def run_sweep(
    scenario: Scenario | str | Path | None,
    policies: Sequence[str] | None = None,
    params: Mapping[str, Sequence[Any]] | None = None,
    seeds: int | Sequence[int] = 3,
    *,
    out: str | Path | None = None,
    workers: int | None = None,
    dask: str | Any | None = None,
    chunk: int | None = None,
    progress: bool = False,
    on_run: Callable[[Mapping[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Run the grid ``policies x params x seeds``; one row per run (see the module doc).

    ``seeds``: a count (from the scenario's seed, like :func:`evsim.compare`) or a list.
    ``workers``: local processes (default ``os.cpu_count()``; 1 runs in this process).
    ``dask``: a scheduler address or a ``distributed.Client`` instead of the local pool.
    ``out``: Parquet file to resume from and to rewrite after every ``chunk`` runs (default
    ``max(workers, 4)``). ``progress`` shows a rich progress bar. Rows come back in grid order.
    """
    from evsim.api import as_scenario

    sc = as_scenario(scenario)
    specs = expand_grid(sc, list(policies or [sc.policy.name]), params, seeds)
    base = sc.model_dump()
    n_workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    chunk = max(1, int(chunk if chunk is not None else max(n_workers, 4)))

    out_path = Path(out) if out is not None else None
    previous: list[dict[str, Any]] = []
    if out_path is not None and out_path.exists():
        old = pd.read_parquet(out_path)
        if "run_key" not in old.columns:
            raise ValueError(f"{out_path}: not a sweep table (no run_key column)")
        previous = old.to_dict("records")
    done: dict[str, dict[str, Any]] = {str(r["run_key"]): r for r in previous}
    todo = [s for s in specs if s.key not in done]

    def save() -> None:
        if out_path is not None:
            _write_atomic(_frame(list(done.values())), out_path)

    rows = _dask(base, todo, dask) if dask is not None else _local(base, todo, n_workers)
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]sweep[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        skipped = len(specs) - len(todo)
        task = bar.add_task(
            f"{sc.name}" + (f" ({skipped} done before)" if skipped else ""), total=len(todo)
        )
        bar.start()
    try:
        since_save = 0
        try:
            for row in rows:
                done[str(row["run_key"])] = row
                since_save += 1
                if bar is not None:
                    bar.advance(task)
                if on_run is not None:
                    on_run(row)
                if since_save >= chunk:
                    save()
                    since_save = 0
        finally:
            rows.close()  # shut the pool down / cancel the futures now, also on Ctrl-C
            if since_save:
                save()
    finally:
        if bar is not None:
            bar.stop()
    return _frame([done[s.key] for s in specs])

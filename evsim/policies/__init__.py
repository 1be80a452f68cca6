"""Station-choice policies: pure functions ``(request, snapshot, now) -> Choice | None``.

A policy sees the world only through a :class:`~evsim.snapshot.NetworkSnapshot`; it performs
no I/O and reads no clock (``now`` is an argument), so the same function drives the SimPy model
and the live company servers. Built-ins are registered by name; a user's own policy is named
``"package.module:function"``. Keyword parameters (weights) are bound with :func:`resolve`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Protocol

from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot

__all__ = ["POLICIES", "Policy", "register", "resolve"]


class Policy(Protocol):
    def __call__(
        self, request: ChargeRequest, snapshot: NetworkSnapshot, now: float
    ) -> Choice | None: ...


POLICIES: dict[str, Callable[..., Choice | None]] = {}


def register(name: str) -> Callable[[Callable[..., Choice | None]], Callable[..., Choice | None]]:
    def deco(fn: Callable[..., Choice | None]) -> Callable[..., Choice | None]:
        POLICIES[name] = fn
        return fn

    return deco


def resolve(name: str, params: Mapping[str, float] | None = None) -> Policy:
    """The policy called ``name`` (built-in or ``module:function``) with ``params`` bound.

    Raises ``ValueError`` naming the problem for unknown names or parameters.
    """
    if ":" in name:
        mod_name, _, fn_name = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"policy {name!r}: cannot import ({err})") from None
        if not callable(fn):
            raise ValueError(f"policy {name!r} is not callable")
    else:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; built-ins: {', '.join(sorted(POLICIES))}")
        fn = POLICIES[name]
    params = dict(params or {})
    if params:
        import inspect

        sig = inspect.signature(fn)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in params if k not in sig.parameters and not accepts_any]
        if unknown:
            allowed = [p for p in sig.parameters if p not in {"request", "snapshot", "now"}]
            raise ValueError(f"policy {name!r}: unknown parameter(s) {unknown}; known: {allowed}")
        return functools.partial(fn, **params)
    return fn


from evsim.policies import builtin as _builtin  # noqa: E402,F401  (registers the built-ins)

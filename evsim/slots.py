"""Cheap constructors for the frozen, slotted dataclasses made on the model's hot paths.

A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__`` (it has
to get past its own ``__setattr__``, which refuses), which costs about twice what setting
the slots directly does. :func:`slot_constructor` generates, once per class, a positional
function that does just that: ``object.__new__`` and each slot's own setter, in field
order, then ``__post_init__`` when asked (where the class validates). Generated source, as
``dataclasses`` and ``namedtuple`` do it, so each call is one flat function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["slot_constructor"]


def slot_constructor(cls: type[T], *, post_init: bool = False) -> Callable[..., T]:
    """``make(*values)`` building a ``cls`` from all its fields, positionally in field
    order (no defaults), equal to ``cls(*values)``; ``post_init``: run ``__post_init__``."""
    if not (dataclasses.is_dataclass(cls) and getattr(cls, "__slots__", None)):
        raise TypeError(f"{cls.__name__} is not a slotted dataclass")
    names = [f.name for f in dataclasses.fields(cls)]
    args = ", ".join(names)
    lines = [f"def make({args}):", "    obj = new(cls)"]
    lines += [f"    set_{name}(obj, {name})" for name in names]
    if post_init:
        lines.append("    obj.__post_init__()")
    lines.append("    return obj")
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    scope.update({f"set_{name}": getattr(cls, name).__set__ for name in names})
    exec("\n".join(lines), scope)
    make: Callable[..., T] = scope["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    make.__doc__ = f"``{cls.__name__}({args})`` without the frozen ``__init__``."
    return make

"""Polling helper shared by the tests that wait on real processes, brokers and servers."""

from __future__ import annotations

import time
from typing import Any


def wait_for(cond: Any, timeout: float = 15.0, what: str = "condition", step: float = 0.05
             ) -> Any:
    """Call ``cond`` every ``step`` s until it returns something truthy (returned), or fail
    with an AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")

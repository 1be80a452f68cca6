"""The Makefile's bootstrap (`make -n`, nothing run): `make run` installs the package with its
runtime dependencies only, `make test` the dev and live extras, `make lab` the lab extra too,
each once, and again when pyproject.toml is newer than what was installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make binary here")


def plan(target: str, venv: Path) -> list[str]:
    """The commands ``make -n target`` would run with ``.venv`` at ``venv``."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def installs(lines: list[str]) -> list[str]:
    """What each ``pip install -e`` of the plan installs (``"."``, ``".[dev,live]"``)."""
    return [line.rsplit(" ", 1)[1].strip('"') for line in lines if "pip install -q -e" in line]


def test_a_fresh_clone_gets_a_venv_then_only_what_the_target_needs(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    run = plan("run", venv)
    assert run[0].endswith(f"-m venv {venv}")
    assert installs(run) == ["."]
    assert run[-1] == f"{venv}/bin/evsim simulate --out runs/default"
    test = plan("test", venv)
    assert installs(test) == [".[dev,live]"] and "pytest" in test[-1]
    assert installs(plan("lab", venv)) == [".[dev,live,lab]"]


def test_each_set_of_extras_is_installed_once_and_again_after_pyproject_changes(
    tmp_path: Path,
) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    base = venv / ".installed-base"
    base.touch()
    os.utime(base, (newer, newer))
    assert installs(plan("run", venv)) == []  # `make run` again: nothing to install
    assert installs(plan("test", venv)) == [".[dev,live]"]  # `make test` after `make run`
    full = venv / ".installed-dev-live"
    full.touch()
    os.utime(full, (newer, newer))
    assert installs(plan("test", venv)) == []
    assert installs(plan("lint", venv)) == []
    # the lab extra is a set of its own: `make lab` after `make test` installs it
    assert installs(plan("lab", venv)) == [".[dev,live,lab]"]
    # pyproject.toml newer than the stamps: installed again
    older = newer - 3600 * 24 * 365 * 50
    os.utime(base, (older, older))
    os.utime(full, (older, older))
    assert installs(plan("run", venv)) == ["."]
    assert installs(plan("test", venv)) == [".[dev,live]"]

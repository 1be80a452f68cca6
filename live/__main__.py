"""``python -m live ...``: the same commands as ``evsim live ...`` (see :mod:`live.cli`)."""

from live.cli import app

if __name__ == "__main__":
    app(prog_name="python -m live")

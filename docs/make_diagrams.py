"""Render the protocol's state diagrams from its transition tables.

Reads ``BOOKING_TRANSITIONS`` and ``TRIP_TRANSITIONS`` from
:mod:`evsim.protocol.states` (the same tables the code uses to validate every
transition) and writes, next to this script:

* ``booking_states.dot`` / ``trip_states.dot`` -- Graphviz text, always;
* ``booking_states.png`` / ``trip_states.png`` -- rendered with ``dot`` when
  it is on PATH, otherwise drawn with matplotlib (layered left to right).

Usage: ``python docs/make_diagrams.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

from evsim.protocol.states import (
    BOOKING_TERMINAL,
    BOOKING_TRANSITIONS,
    TRIP_CLOSED,
    TRIP_TRANSITIONS,
    BookingState,
    TripState,
)

Table = Mapping[tuple[Enum, Enum], Enum]


def edges(table: Table) -> dict[tuple[str, str], list[str]]:
    """(from, to) -> event names, in table order."""
    out: dict[tuple[str, str], list[str]] = {}
    for (src, ev), dst in table.items():
        out.setdefault((src.value, dst.value), []).append(ev.value)
    return out


def to_dot(name: str, table: Table, initial: Enum, final: set[str]) -> str:
    lines = [
        f"digraph {name} {{",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        '  __start [shape=point, width=0.15, label=""];',
        f"  __start -> {initial.value};",
    ]
    states = sorted({s for pair in edges(table) for s in pair})
    for s in states:
        if s in final:
            lines.append(f'  {s} [peripheries=2, fillcolor="#f4f4f4"];')
    for (src, dst), evs in edges(table).items():
        label = "\\n".join(evs)  # a Graphviz line break between events
        lines.append(f'  {src} -> {dst} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def layers(table: Table, initial: Enum) -> dict[str, int]:
    """Longest-path-free BFS depth of each state from the initial one."""
    depth = {initial.value: 0}
    frontier = [initial.value]
    es = edges(table)
    while frontier:
        nxt = []
        for s in frontier:
            for (a, b) in es:
                if a == s and b not in depth:
                    depth[b] = depth[s] + 1
                    nxt.append(b)
        frontier = nxt
    return depth


def draw_matplotlib(path: Path, title: str, table: Table, initial: Enum, final: set[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = layers(table, initial)
    cols: dict[int, list[str]] = {}
    for s, d in depth.items():
        cols.setdefault(d, []).append(s)
    es = edges(table)
    for d, ss in list(cols.items()):  # put a same-column successor right below its source
        ordered: list[str] = []
        for s in ss:
            if s not in ordered:
                ordered.append(s)
            ordered += [b for (a, b) in es if a == s and b in ss and b not in ordered]
        cols[d] = ordered
    pos: dict[str, tuple[float, float]] = {}
    for d, ss in cols.items():
        for i, s in enumerate(ss):
            pos[s] = (d * 3.2, (len(ss) - 1) / 2 * 1.4 - i * 1.4)
    height = max(len(v) for v in cols.values())
    fig, ax = plt.subplots(figsize=(3.2 * len(cols) + 1, 1.4 * height + 1.5))
    ax.set_title(title)
    ax.axis("off")
    for (a, b), evs in edges(table).items():
        label = "\n".join(evs)
        (x0, y0), (x1, y1) = pos[a], pos[b]
        if a == b:
            ax.annotate("", xy=(x0 + 0.3, y0 + 0.25), xytext=(x0 - 0.3, y0 + 0.25),
                        arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=-1.2"})
            ax.text(x0, y0 + 0.85, label, ha="center", fontsize=7, color="#224")
            continue
        ax.annotate("", xy=(x1 - 0.75, y1), xytext=(x0 + 0.75, y0),
                    arrowprops={"arrowstyle": "->", "color": "#446",
                                "connectionstyle": "arc3,rad=0.08"})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, label, ha="center", fontsize=7,
                color="#224")
    for s, (x, y) in pos.items():
        ax.text(x, y, s, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "fc": "#f4f4f4" if s in final else "#eef3fb",
                      "ec": "#333", "lw": 2.0 if s in final else 1.0})
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: Path, name: str, title: str, table: Table, initial: Enum,
           final: set[str]) -> list[Path]:
    dot_path = out / f"{name}.dot"
    png_path = out / f"{name}.png"
    dot_path.write_text(to_dot(name, table, initial, final))
    dot = shutil.which("dot")
    if dot:
        subprocess.run([dot, "-Tpng", str(dot_path), "-o", str(png_path)], check=True)
    else:
        draw_matplotlib(png_path, title, table, initial, final)
    return [dot_path, png_path]


def main() -> None:
    ap = argparse.ArgumentParser(description="render protocol state diagrams")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    written = render(args.out, "booking_states", "Booking (per stop, at the participant)",
                     BOOKING_TRANSITIONS, BookingState.PENDING,
                     {s.value for s in BOOKING_TERMINAL} | {BookingState.FULFILLED.value})
    written += render(args.out, "trip_states", "Trip (at the coordinator)", TRIP_TRANSITIONS,
                      TripState.PREPARING, {s.value for s in TRIP_CLOSED})
    for p in written:
        print(p)


if __name__ == "__main__":
    main()

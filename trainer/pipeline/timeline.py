"""Gantt chart of a simulated iteration as plain SVG text: one row per node, one bar per task."""
from __future__ import annotations

import math
from html import escape

from trainer.pipeline.simulator import BACKWARD, FORWARD, LOSS, SimulationResult

COLOURS = {FORWARD: "#4e79a7", BACKWARD: "#f28e2b", LOSS: "#59a14f"}

_ROW = 22  # px per node row
_MIN_LEFT = 150  # px for the row labels, at least
_CHAR_PX = 6.5  # width of one label character at font-size 11
_TOP = 40  # px for the title and legend
_WIDTH = 1000  # px for the time axis


def _tick_step(span: float) -> float:
    """A 1-2-5 step giving about ten ticks over `span` seconds."""
    raw = max(span, 1e-9) / 10
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def timeline_svg(
    result: SimulationResult,
    *,
    stage_of_node: dict[int, int] | None = None,
    labels: dict[int, str] | None = None,
    title: str = "",
) -> str:
    """The iteration as SVG. Rows are sorted by stage then node id; a bar's tooltip names the
    microbatch, the task and its times."""
    son = stage_of_node or {}
    nodes = sorted(result.timelines, key=lambda n: (son.get(n, 0), n))
    row_labels = {}
    for node in nodes:
        label = f"node {node}"
        if node in son:
            label += f" · stage {son[node]}"
        if labels and node in labels:
            label += f" · {labels[node]}"
        row_labels[node] = label
    left = max(_MIN_LEFT, int(8 + _CHAR_PX * max((len(t) for t in row_labels.values()), default=0)))
    span = max(result.iteration_time, 1e-9)
    scale = _WIDTH / span
    height = _TOP + _ROW * len(nodes) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + _WIDTH + 20}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="100%" height="100%" fill="white"/>',
        f'<text x="4" y="14" font-size="13">{escape(title)} — iteration {result.iteration_time:.2f} s</text>',
    ]
    x = left
    for kind in (FORWARD, LOSS, BACKWARD):
        out.append(f'<rect x="{x}" y="22" width="12" height="10" fill="{COLOURS[kind]}"/>')
        out.append(f'<text x="{x + 16}" y="31">{kind}</text>')
        x += 90
    for row, node in enumerate(nodes):
        y = _TOP + row * _ROW
        out.append(f'<text x="4" y="{y + 15}">{escape(row_labels[node])}</text>')
        if row % 2:
            out.append(f'<rect x="{left}" y="{y}" width="{_WIDTH}" height="{_ROW}" fill="#f4f4f4"/>')
        for e in result.timelines[node]:
            w = max((e.end - e.start) * scale, 0.5)
            tip = f"microbatch {e.microbatch} {e.kind} {e.start:.2f}-{e.end:.2f} s"
            out.append(
                f'<rect x="{left + e.start * scale:.2f}" y="{y + 3}" width="{w:.2f}" height="{_ROW - 6}" '
                f'fill="{COLOURS.get(e.kind, "#999")}" stroke="white" stroke-width="0.5">'
                f"<title>{escape(tip)}</title></rect>"
            )
    axis_y = _TOP + _ROW * len(nodes)
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + _WIDTH}" y2="{axis_y}" stroke="black"/>')
    step = _tick_step(span)
    tick = 0.0
    while tick <= span + 1e-9:
        tx = left + tick * scale
        out.append(f'<line x1="{tx:.2f}" y1="{axis_y}" x2="{tx:.2f}" y2="{axis_y + 4}" stroke="black"/>')
        out.append(f'<text x="{tx:.2f}" y="{axis_y + 16}" text-anchor="middle">{tick:g} s</text>')
        tick = round(tick + step, 9)
    out.append("</svg>")
    return "\n".join(out) + "\n"

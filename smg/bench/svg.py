"""Plain inline SVG charts for the HTML report (pure: strings in, strings out).

No scripts and no external resources: axes with "nice" ticks, polylines, step
outlines, bars, Gantt rows and a legend; hover text comes from SVG <title> elements.
Coordinates are rounded to 0.1 px so the output is deterministic and small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
FAIL = "#d62728"
WIDTH = 640
HEIGHT = 300
# Plot-area margins: tick labels left and below; the title and the legend row above.
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 44, 44


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_step(span: float, count: int) -> float:
    """The 1, 2, 2.5 or 5 x 10^k step giving about `count` intervals over `span`."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Nice tick values covering [lo, hi]: the first <= lo, the last >= hi."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        hi = lo + (abs(lo) if lo else 1.0)
    step = nice_step(hi - lo, count)
    first = math.floor(lo / step + 1e-9) * step
    out = []
    v = first
    while v < hi - step * 1e-9 and len(out) < 100:
        out.append(_clean(v))
        v = first + step * len(out)
    out.append(_clean(v))
    return out


def _clean(v: float) -> float:
    # Drop float noise such as 0.30000000000000004 so labels and tests see 0.3.
    return float(f"{v:.12g}")


def fmt(v: float) -> str:
    """A tick label: integers without a point, others in at most 4 significant digits."""
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def _n(v: float) -> str:
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


class Scale:
    """Linear map from the data interval [d0, d1] to pixels [p0, p1]."""

    def __init__(self, d0: float, d1: float, p0: float, p1: float) -> None:
        self.d0, self.d1, self.p0, self.p1 = d0, d1, p0, p1

    def __call__(self, v: float) -> float:
        if self.d1 == self.d0:
            return self.p0
        return self.p0 + (v - self.d0) * (self.p1 - self.p0) / (self.d1 - self.d0)


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    dashed: bool = False
    markers: bool = False


@dataclass
class Chart:
    """One x/y chart: frame, ticks, labels; `body` collects the drawn elements."""

    title: str
    xlabel: str
    ylabel: str
    xlo: float
    xhi: float
    ylo: float
    yhi: float
    width: int = WIDTH
    height: int = HEIGHT
    body: list[str] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.xt = ticks(self.xlo, self.xhi)
        self.yt = ticks(self.ylo, self.yhi)
        self.x = Scale(self.xt[0], self.xt[-1], LEFT, self.width - RIGHT)
        self.y = Scale(self.yt[0], self.yt[-1], self.height - BOTTOM, TOP)

    def render(self) -> str:
        w, h = self.width, self.height
        px0, px1 = LEFT, w - RIGHT
        py0, py1 = h - BOTTOM, TOP
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" class="chart" role="img" aria-label="{escape(self.title)}">',
            f'<text x="{w / 2:g}" y="18" text-anchor="middle" class="title">'
            f"{escape(self.title)}</text>",
        ]
        for v in self.xt:
            px = _n(self.x(v))
            parts.append(f'<line x1="{px}" y1="{py0}" x2="{px}" y2="{py1}" class="grid"/>')
            parts.append(
                f'<text x="{px}" y="{py0 + 14}" text-anchor="middle" class="tick">{fmt(v)}</text>'
            )
        for v in self.yt:
            py = _n(self.y(v))
            parts.append(f'<line x1="{px0}" y1="{py}" x2="{px1}" y2="{py}" class="grid"/>')
            parts.append(
                f'<text x="{px0 - 4}" y="{py}" text-anchor="end" dy="0.32em" class="tick">'
                f"{fmt(v)}</text>"
            )
        parts.append(f'<path d="M{px0},{py1}V{py0}H{px1}" class="axis"/>')
        parts.append(
            f'<text x="{(px0 + px1) / 2:g}" y="{h - 8}" text-anchor="middle" class="label">'
            f"{escape(self.xlabel)}</text>"
        )
        parts.append(
            f'<text transform="translate(14,{(py0 + py1) / 2:g}) rotate(-90)" '
            f'text-anchor="middle" class="label">{escape(self.ylabel)}</text>'
        )
        parts.extend(self.body)
        parts.extend(_legend(self.legend, px0, px1))
        parts.append("</svg>")
        return "\n".join(parts)

    # -- drawing ---------------------------------------------------------------------

    def line(self, s: Series) -> None:
        """A polyline through the points (hover: the series name)."""
        if not s.points:
            return
        d = "M" + "L".join(f"{_n(self.x(px))},{_n(self.y(py))}" for px, py in s.points)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        self.body.append(
            f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}>'
            f"<title>{escape(s.name)}</title></path>"
        )
        if s.markers:
            for px, py in s.points:
                self.marker(px, py, s.color, f"{s.name}: {fmt(px)}, {py:.4g}")
        self.legend.append((s.name, s.color))

    def marker(self, px: float, py: float, col: str, tip: str, cross: bool = False) -> None:
        cx, cy = _n(self.x(px)), _n(self.y(py))
        if cross:
            self.body.append(
                f'<path d="M{cx},{cy}m-5,-5l10,10m0,-10l-10,10" stroke="{col}" '
                f'stroke-width="2"><title>{escape(tip)}</title></path>'
            )
        else:
            self.body.append(
                f'<circle cx="{cx}" cy="{cy}" r="4" fill="{col}"><title>{escape(tip)}</title>'
                "</circle>"
            )

    def steps(self, name: str, edges: Sequence[float], counts: Sequence[float], col: str) -> None:
        """A histogram as a filled step outline (overlays stay readable)."""
        if not counts:
            return
        base = _n(self.y(0.0)) if self.yt[0] <= 0 else _n(self.y(self.yt[0]))
        d = [f"M{_n(self.x(edges[0]))},{base}"]
        for i, c in enumerate(counts):
            d.append(f"V{_n(self.y(c))}H{_n(self.x(edges[i + 1]))}")
        d.append(f"V{base}Z")
        self.body.append(
            f'<path d="{"".join(d)}" fill="{col}" fill-opacity="0.25" stroke="{col}" '
            f'stroke-width="1.5"><title>{escape(name)}</title></path>'
        )
        self.legend.append((name, col))

    def hline(self, v: float, col: str, tip: str) -> None:
        py = _n(self.y(v))
        self.body.append(
            f'<line x1="{LEFT}" y1="{py}" x2="{self.width - RIGHT}" y2="{py}" stroke="{col}" '
            f'stroke-width="1.5" stroke-dasharray="4 3"><title>{escape(tip)}</title></line>'
        )


def _legend(entries: list[tuple[str, str]], left: float, right: float) -> list[str]:
    """One row between the title and the plot area (never over the data); names are
    shortened so that every entry fits (about 6 px per character)."""
    seen: list[tuple[str, str]] = []
    for e in entries:
        if e not in seen:
            seen.append(e)
    if not seen:
        return []
    room = (right - left) / len(seen)
    chars = max(4, int((room - 28) / 6))
    out = []
    x = left
    y = TOP - 10
    for name, col in seen:
        label = name if len(name) <= chars else name[: chars - 1] + "…"
        out.append(
            f'<rect x="{_n(x)}" y="{y - 8}" width="10" height="10" fill="{col}"/>'
            f'<text x="{_n(x + 14)}" y="{y}" class="legend">{escape(label)}</text>'
        )
        x += 28 + 6 * len(label)
    return out


def bars(
    title: str,
    categories: Sequence[str],
    groups: Sequence[tuple[str, str, Sequence[float]]],
    ylabel: str,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """Grouped vertical bars: one group per category, one bar per (name, colour, values)."""
    top = max((v for _, _, vals in groups for v in vals), default=1.0) or 1.0
    yt = ticks(0.0, top)
    y = Scale(yt[0], yt[-1], height - BOTTOM, TOP)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" class="chart" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2:g}" y="18" text-anchor="middle" class="title">{escape(title)}</text>',
    ]
    for v in yt:
        py = _n(y(v))
        parts.append(f'<line x1="{LEFT}" y1="{py}" x2="{width - RIGHT}" y2="{py}" class="grid"/>')
        parts.append(
            f'<text x="{LEFT - 4}" y="{py}" text-anchor="end" dy="0.32em" class="tick">'
            f"{fmt(v)}</text>"
        )
    slot = (width - LEFT - RIGHT) / max(len(categories), 1)
    bar_w = slot * 0.8 / max(len(groups), 1)
    for ci, cat in enumerate(categories):
        cx = LEFT + slot * (ci + 0.5)
        parts.append(
            f'<text x="{_n(cx)}" y="{height - BOTTOM + 14}" text-anchor="middle" class="tick">'
            f"{escape(cat[:24])}</text>"
        )
        for gi, (name, col, vals) in enumerate(groups):
            v = vals[ci]
            x0 = LEFT + slot * ci + slot * 0.1 + bar_w * gi
            parts.append(
                f'<rect x="{_n(x0)}" y="{_n(y(v))}" width="{_n(bar_w)}" '
                f'height="{_n(y(0.0) - y(v))}" fill="{col}"><title>{escape(name)} {escape(cat)}: '
                f"{v:.4g}</title></rect>"
            )
    parts.append(f'<path d="M{LEFT},{TOP}V{height - BOTTOM}H{width - RIGHT}" class="axis"/>')
    parts.append(
        f'<text transform="translate(14,{(height - BOTTOM + TOP) / 2:g}) rotate(-90)" '
        f'text-anchor="middle" class="label">{escape(ylabel)}</text>'
    )
    if len(groups) > 1:
        parts.extend(_legend([(n, c) for n, c, _ in groups], LEFT, width - RIGHT))
    parts.append("</svg>")
    return "\n".join(parts)


@dataclass
class Span:
    """One request on the timeline: [start, end] seconds, drawn in `color`."""

    start: float
    end: float
    color: str
    tip: str
    min_width: float = 1.0  # px: a fast failure still shows


def gantt(
    title: str,
    spans: Sequence[Span],
    xlabel: str,
    legend: Sequence[tuple[str, str]] = (),
    width: int = WIDTH,
) -> str:
    """One row per span, top to bottom in the given order (Gantt-style)."""
    row = 2.0 if len(spans) > 150 else 4.0
    height = int(TOP + BOTTOM + max(len(spans), 1) * row + 4)
    hi = max((s.end for s in spans), default=1.0)
    lo = min((s.start for s in spans), default=0.0)
    ch = Chart(title, xlabel, "request", min(lo, 0.0), hi, 0, 1, width=width, height=height)
    ch.yt = []  # rows, not values: no y ticks
    ch.legend.extend(legend)
    for i, s in enumerate(spans):
        x0, x1 = ch.x(s.start), ch.x(max(s.end, s.start))
        ch.body.append(
            f'<rect x="{_n(x0)}" y="{_n(TOP + 2 + i * row)}" width="{_n(max(x1 - x0, s.min_width))}" '
            f'height="{_n(row * 0.8)}" fill="{s.color}"><title>{escape(s.tip)}</title></rect>'
        )
    return ch.render()

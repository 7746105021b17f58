"""A small line-chart writer to PNG (zlib only: the benches do not pull in a plotting library)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]
# 3x5 digits and a few letters for tick labels
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "s": "000011010001110",
}


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, colour: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                xx, yy = x + dx, y + dy
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour, size: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, colour, size)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, colour=(0, 0, 0), scale: int = 2) -> None:
        for ch in s:
            glyph = GLYPHS.get(ch)
            if glyph:
                for i, bit in enumerate(glyph):
                    if bit == "1":
                        self.dot(x + (i % 3) * scale, y + (i // 3) * scale, colour, scale)
            x += 4 * scale

    def save(self, path: Path) -> None:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        Path(path).write_bytes(png)


def line_chart(path: Path, series: list[tuple[str, list[tuple[float, float]]]], width: int = 900,
               height: int = 500) -> list[tuple[str, tuple[int, int, int]]]:
    """Plot each (name, [(x, y)]) series; returns the legend (name, colour): the PNG carries numbers
    on the axes only, the caller writes the legend beside it."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, 20, 20, 40
    xs = [x for _, pts in series for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, pts in series for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[int, int]:
        return (left + round((x - x0) / (x1 - x0) * (width - left - right)),
                height - bottom - round((y - y0) / (y1 - y0) * (height - top - bottom)))

    grey = (200, 200, 200)
    for i in range(6):
        gx = x0 + (x1 - x0) * i / 5
        gy = y0 + (y1 - y0) * i / 5
        px, _ = at(gx, y0)
        _, py = at(x0, gy)
        canvas.line(px, top, px, height - bottom, grey)
        canvas.line(left, py, width - right, py, grey)
        canvas.text(px - 10, height - bottom + 8, f"{gx:.0f}s")
        canvas.text(4, py - 5, f"{gy:.2f}")
    canvas.line(left, height - bottom, width - right, height - bottom, (0, 0, 0))
    canvas.line(left, top, left, height - bottom, (0, 0, 0))
    legend = []
    for n, (name, pts) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        legend.append((name, colour))
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            canvas.line(*at(ax, ay), *at(bx, by), colour, 2)
    canvas.save(path)
    return legend

"""The one-byte projected gradient: sign bit + 7-bit magnitude index, stochastic rounding.

Byte q: bit 7 is the sign (1 = negative), bits 0-6 the level m in 0..127; level 0 is exactly 0.

- linear scale: level m is m * g_max / 127.
- log scale:    level m >= 1 is g_min * r^(m-1) with r = (g_max / g_min)^(1/126), so level 1 is
  g_min and level 127 is g_max.

|g| is rounded to one of its two neighbouring levels a <= |g| <= b, up with probability
(|g| - a) / (b - a), so the decoded value is unbiased for |g| <= g_max. |g| above g_max is
clipped to g_max: that bounds every contribution's influence. Error bounds for |g| <= g_max:
linear |deq - g| < g_max / 127; log |deq - g| < (r - 1) |g| when |g| >= g_min, and < g_min below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LEVELS = 127
SIGN = 0x80
SCALES = ("log", "linear")


class QuantizeError(ValueError):
    """A value or byte the quantizer cannot represent."""


@dataclass(frozen=True)
class Quantizer:
    scale: str = "log"
    g_max: float = 64.0
    g_min: float = 1e-3  # log scale only

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise QuantizeError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not (math.isfinite(self.g_max) and self.g_max > 0):
            raise QuantizeError(f"g_max must be finite and positive, got {self.g_max}")
        if self.scale == "log" and not (0 < self.g_min < self.g_max):
            raise QuantizeError(f"log scale needs 0 < g_min < g_max, got g_min={self.g_min}")

    @property
    def ratio(self) -> float:
        return (self.g_max / self.g_min) ** (1.0 / (LEVELS - 1))

    def level(self, m: int) -> float:
        if m == 0:
            return 0.0
        if self.scale == "linear":
            return m * self.g_max / LEVELS
        return self.g_min * self.ratio ** (m - 1)

    def encode(self, g: float, u: float) -> int:
        """The byte for ``g``; ``u`` in [0, 1) drives the stochastic rounding. Non-finite g is refused."""
        if not math.isfinite(g):
            raise QuantizeError(f"cannot quantize a non-finite value {g}")
        if not 0.0 <= u < 1.0:
            raise QuantizeError(f"u must be in [0, 1), got {u}")
        sign = SIGN if g < 0 else 0
        mag = min(abs(g), self.g_max)
        lo = self._floor_level(mag)
        if lo >= LEVELS:
            return sign | LEVELS
        a, b = self.level(lo), self.level(lo + 1)
        m = lo + 1 if u < (mag - a) / (b - a) else lo
        return sign | m

    def _floor_level(self, mag: float) -> int:
        """The largest m with level(m) <= mag."""
        if self.scale == "linear":
            m = int(mag * LEVELS / self.g_max)
        elif mag < self.g_min:
            return 0
        else:
            m = 1 + int(math.log(mag / self.g_min) / math.log(self.ratio))
        m = max(0, min(m, LEVELS))
        while m > 0 and self.level(m) > mag:  # log/float rounding can land one level off
            m -= 1
        while m < LEVELS and self.level(m + 1) <= mag:
            m += 1
        return m

    def decode(self, q: int) -> float:
        if type(q) is not int or not 0 <= q <= 0xFF:
            raise QuantizeError(f"a quantized scalar is one byte (0..255), got {q!r}")
        value = self.level(q & LEVELS)
        return -value if q & SIGN else value

"""Byzantine stage replicas: checks on every tensor a peer hands this node, and the bans they lead to.

A node checks what arrives from the peer that sent it (the RPC caller, authenticated by the
transport), before computing with it:
- activations (``pp.forward``'s x, ``pp.arrive``'s x) and activation gradients (``pp.backward``,
  ``pp.arrive``'s grad): any non-finite value is bad. A root-mean-square far off the scale is bad
  when it is far off two references at once: the running scale (the median RMS of the last
  ``window`` tensors of that kind this node accepted from that stage, or from any stage until
  there are ``warmup`` of them; gradients always from any stage, the residual connections keep
  their scale along the path) and the sender's stage mates now (what this node saw from other
  replicas of that stage in this iteration and the one before). Far off means outside
  [m / f, m * f] for activations and above m * 2f for gradients, f = ``factor``; with no stage
  mate seen, gradients above 2f of the running scale alone are refused without a strike and
  join the scale (a data node on a steady schedule sees one replica of the next stage for many
  iterations, and honest lone gradients drift 20-25x within the window), activations outside f^3
  of it (a stage seen for the first time is judged on every stage's scale). Scales move during training, together
  for every replica of a stage (in the multi-process runs the residual stream's RMS jumped 11x
  within two iterations and the activation gradients' fell 10x), while a Byzantine replica moves
  alone; gradients may shrink by any amount (that slows a stage down and harms nobody's weights);
- parameter gradients at the stage's reduce, per replica (sum over its microbatches / count, a
  count of 0 taken as 1): non-finite is bad; so is a norm above f x the reference: this node's own
  per-microbatch norm, or the median of those accepted in earlier reduces if larger (before there
  is history and without its own, the smallest contribution; with history but no gradient of its
  own this iteration, 2f x the history). Replicas are compared with each
  other, not averaged together. A replica checks the reducer's averaged gradient against its own,
  with 2f: the reducer took contributions within f of its own, so an honest average can be about
  f off a replica whose paths gave it small gradients, while garbage stays far above.
A tensor that fails is refused (or left out of the average) and its sender gets a strike (an
activation outlier that came through other nodes: the one node of the route no accepted
activations came through lately, or nobody; see ``Guard._culprit``);
non-finite values ban at once, outliers at ``strikes`` in a row (an accepted tensor clears them;
one tensor sent again is no second strike). When the worker sees a replica it did not see at its
last look (a lost stage served again by rebuilt weights, which move every scale along the paths;
a newcomer), the scales start afresh (``forget_scales``).
What the guard sees is only what this node received; the worker shares its bans through a record
(trainer/pipeline/runtime.py).
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

KINDS = ("x", "grad")  # activations and activation gradients
REFUSALS_KEPT = 1024  # refused tensors remembered, so that one sent again is no second strike
GRADIENT_SLACK = 2.0  # activation gradients are outliers above GRADIENT_SLACK * factor of their references


@dataclass(frozen=True)
class GuardSettings:
    enabled: bool = True
    factor: float = 8.0  # how far outside the running scale (either way for activations) is an outlier
    window: int = 16  # tensors remembered per (kind, stage): a few iterations, as scales move in training
    warmup: int = 8  # accepted tensors before outliers are judged
    strikes: int = 2  # outliers that ban a node (non-finite bans at once)


@dataclass
class Guard:
    settings: GuardSettings = field(default_factory=GuardSettings)
    bans: dict[bytes, str] = field(default_factory=dict)  # node -> reason: seen here or adopted
    _scales: dict[tuple, deque] = field(default_factory=dict)  # (kind, stage or None: all, path or None)
    _grad_norms: deque = field(default_factory=lambda: deque(maxlen=16))
    _seen: dict[tuple, deque] = field(default_factory=dict)  # (kind, stage, path) -> (iteration, sender, RMS), refused too
    _strikes: dict[bytes, int] = field(default_factory=dict)  # outliers in a row
    _adopted: set[bytes] = field(default_factory=set)
    _refused: dict[tuple, str] = field(default_factory=dict)  # (sender, what the tensor is) -> why, oldest first
    _vouched: dict[bytes, int] = field(default_factory=dict)  # node -> last iteration an accepted x came through it

    def check(self, sender: bytes, stage: int, kind: str, t: torch.Tensor, iteration: int = 0,
              path: tuple[int, ...] | None = None, ident: tuple | None = None,
              upstream: tuple[bytes, ...] = (), blame_upstream: bool = True) -> str | None:
        """None when ``t`` (of ``kind``, from ``sender`` serving ``stage``, in ``iteration``) is
        acceptable; otherwise why not. Accepted tensors join the running scale. ``path``: the stages
        the tensor came through, when this node knows them itself (a data node's gradients: the path
        its microbatch visited); tensors of different paths have scales of their own, as skipping a
        stage changes the scale of the gradient that flows back (30x in a multi-process run).
        ``ident``: what the tensor is (iteration, microbatch, attempt); the same one sent again (a
        retried delivery) is refused again without another strike: one tensor is one offence.
        ``upstream``: the nodes activations passed through before ``sender`` (the route's
        ``visited``): an outlier is then blamed on the one node of the route that no accepted
        activations came through in this iteration or the one before, or on nobody when that is
        not one node (see ``_culprit``). The route is the sender's word: with ``blame_upstream``
        off (a stage node, which cannot check it) it only clears the sender, never blames another."""
        if not self.settings.enabled:
            return None
        if sender in self.bans:
            return f"{sender.hex()[:16]} is banned: {self.bans[sender]}"
        if ident is not None and (sender, kind, ident) in self._refused:
            return self._refused[(sender, kind, ident)]
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            return self._offence(sender, f"non-finite {_NAMES[kind]} from stage {stage}", at_once=True)
        rms = float(torch.sqrt(torch.mean(t.double() * t.double()))) if t.numel() else 0.0
        window = self.settings.window
        mine = self._scales.setdefault((kind, stage, path), deque(maxlen=window))
        every = self._scales.setdefault((kind, None, path), deque(maxlen=window))
        seen = self._seen.setdefault((kind, stage, path), deque(maxlen=window))
        scale = mine if kind == "x" and len(mine) >= self.settings.warmup else every
        mates = [r for it, node, r in seen if node != sender and it >= iteration - 1]
        seen.append((iteration, sender, rms))
        reason = None
        lone = False
        if len(scale) >= self.settings.warmup:
            f = self.settings.factor
            m = statistics.median(scale)
            if mates:
                # gradients move more: an honest one grew 9.2x within an iteration, early in a run
                # while a stage was skipped; garbage is 50-100x
                g = f * GRADIENT_SLACK if kind == "grad" else f
                off_scale = _off(rms, m, g, kind)
                reason = off_scale and _off(rms, statistics.median(mates), g, kind) and off_scale
            elif kind == "grad":
                # alone (a data node on a steady schedule sees one replica of the next stage for
                # many iterations): refused above 2f of the running scale, but no strike, and the
                # RMS joins the scale. With f^3 here a garbage replica's gradients (25-54x the
                # scale) were taken and poisoned the data nodes' step; but honest lone gradients
                # also drift 20-25x within the window (stage 2 skipped for 13 iterations in the
                # checkpoint baseline test), so a lone outlier is no evidence against its sender:
                # a scale that really moved is followed within half a window, and a garbage
                # replica is banned at its stage's reduce, where its replicas are compared.
                reason = _off(rms, m, f * GRADIENT_SLACK, kind)
                lone = bool(reason)
            else:
                reason = _off(rms, m, f ** 3, kind)  # a new stage's outputs, judged on every stage's scale
        if reason and lone:
            reason = f"{_NAMES[kind]} from stage {stage} with RMS {rms:.3g}, {reason} (no stage mate seen: no strike)"
            logger.info("refused a tensor of %s: %s", sender.hex()[:16], reason)
            mine.append(rms)
            every.append(rms)
        elif reason:
            reason = f"{_NAMES[kind]} from stage {stage} with RMS {rms:.3g}, {reason}"
            culprit = self._culprit(sender, upstream, iteration) if kind == "x" and upstream else sender
            if culprit is None or (culprit != sender and not blame_upstream):
                reason += " (it came through other nodes, and which one made it so cannot be told: no strike)"
                logger.info("refused a tensor of %s: %s", sender.hex()[:16], reason)
            elif culprit != sender:
                reason = self._offence(culprit, f"{reason}, which came through {culprit.hex()[:16]} (the one node "
                                                f"of its route that no accepted activations came through lately)")
            else:
                reason = self._offence(sender, reason)
        if reason:
            if ident is not None:
                self._refused[(sender, kind, ident)] = reason
                while len(self._refused) > REFUSALS_KEPT:
                    del self._refused[next(iter(self._refused))]
            return reason
        self._strikes.pop(sender, None)
        mine.append(rms)
        every.append(rms)
        if kind == "x":
            for node in (*upstream, sender):
                self._vouched[node] = max(self._vouched.get(node, iteration), iteration)
            while len(self._vouched) > REFUSALS_KEPT:
                del self._vouched[next(iter(self._vouched))]
        return None

    def _culprit(self, sender: bytes, upstream: tuple[bytes, ...], iteration: int) -> bytes | None:
        """Whom outlying activations that came through ``upstream`` and then ``sender`` are blamed on.

        Each hop adds its block's output to the residual stream, so a Byzantine replica's scaled
        outputs stay scaled through every honest stage after it: judged by the last hop alone, an
        honest later stage was banned for what its predecessor sent it (bench_byzantine's
        scale-activations). A node that accepted activations came through in this iteration or
        the one before is vouched for; when exactly one node of the route is not, it is blamed;
        when none or several are, no one is (the tensor is still refused)."""
        route = [n for n in dict.fromkeys(upstream) if n != sender] + [sender]
        unvouched = [n for n in route if self._vouched.get(n, iteration - 2) < iteration - 1]
        return unvouched[0] if len(unvouched) == 1 else None

    def check_gradients(self, stage: int, contributions: Mapping[bytes, tuple[Mapping[str, torch.Tensor], int]],
                        trusted: bytes | None = None, slack: float = 1.0) -> dict[bytes, str]:
        """The replicas whose parameter gradients (summed over ``count`` microbatches) are left out
        of the stage's average, with the reason; the rest's per-microbatch norms join the reference.
        ``trusted`` (this node's own) is never left out, and is the reference before there is history.
        A norm is an outlier above ``slack`` x factor x the reference."""
        if not self.settings.enabled:
            return {}
        out: dict[bytes, str] = {}
        norms: dict[bytes, float] = {}
        for node in sorted(contributions):
            grads, count = contributions[node]
            if node in self.bans and node != trusted:
                out[node] = f"banned: {self.bans[node]}"
                continue
            total = 0.0
            for name in sorted(grads):
                g = grads[name].detach().double()
                total += float(torch.sum(g * g))
            if not math.isfinite(total) and node != trusted:
                out[node] = self._offence(node, f"non-finite parameter gradients at the stage {stage} reduce",
                                          at_once=True)
            elif total > 0:
                # a data node's head has gradients from microbatches whose backward did not come
                # back (count 0); a count of 0 is judged as 1, so it cannot hide a large gradient
                norms[node] = math.sqrt(total) / max(count, 1)
        if not norms:
            return out
        history = self._grad_norms
        if len(history) >= self.settings.warmup:
            reference = max(statistics.median(history), norms.get(trusted, 0.0))
            if trusted not in norms:
                # no gradient of its own this iteration (no microbatch came through it): the
                # history alone, from other paths, is a looser reference; an honest replica that
                # took every microbatch after a data node died was 9-14x it and was banned
                slack *= GRADIENT_SLACK
        else:
            reference = norms[trusted] if trusted in norms else min(norms.values())
        for node, norm in sorted(norms.items()):
            if node != trusted and reference > 0 and norm > slack * self.settings.factor * reference:
                out[node] = self._offence(node, f"parameter gradients at the stage {stage} reduce with "
                                                f"{norm / reference:.3g} x the reference norm per microbatch")
        history.extend(norm for node, norm in sorted(norms.items()) if node not in out)
        for node in norms:
            if node not in out:
                self._strikes.pop(node, None)
        return out

    def forget_scales(self) -> None:
        """Start the scales afresh (bans and strikes stay), when a replica appears: a stage that
        was lost may be served again by weights rebuilt from its neighbours or re-initialised, and
        every scale downstream and upstream of it moves (an honest stage's gradients grew 218x
        after a neighbour was rebuilt by a swap copy, in a multi-process recovery run). Until
        ``warmup`` tensors are accepted again, only non-finite values are refused."""
        self._scales.clear()
        self._seen.clear()
        self._grad_norms.clear()

    def ban(self, node: bytes, reason: str, adopted: bool = False) -> bool:
        """Ban ``node`` (True when it was not banned already); ``adopted``: on another's word."""
        if node in self.bans:
            return False
        self.bans[node] = reason
        if adopted:
            self._adopted.add(node)
        return True

    def adopted(self, node: bytes) -> bool:
        return node in self._adopted

    def _offence(self, node: bytes, reason: str, at_once: bool = False) -> str:
        strikes = self._strikes[node] = self._strikes.get(node, 0) + 1
        if at_once or strikes >= self.settings.strikes:
            self.ban(node, reason)
        logger.warning("refused a tensor of %s (strike %d): %s", node.hex()[:16], strikes, reason)
        return reason


_NAMES = {"x": "activations", "grad": "activation gradients"}


def _off(rms: float, m: float, f: float, kind: str) -> str:
    """Why ``rms`` is off the scale ``m`` by more than ``f`` (activations either way, gradients
    upwards only), or "" when it is not."""
    if m <= 0 or (rms <= m * f and (kind != "x" or rms >= m / f)):
        return ""
    return f"{rms / m:.3g} x the scale {m:.3g}"

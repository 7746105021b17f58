"""Chaos tests: this Python process's wall clock runs some seconds off, fixed or changed at run time.

Put this folder on PYTHONPATH of one node process: Python imports ``sitecustomize`` at start-up,
before any module binds ``time.time`` (hivemind's ``get_dht_time`` is ``time.time``), so every
timestamp the node signs, and every freshness check it makes, uses the skewed clock; the monotonic
clock (timeouts, asyncio) is untouched, as with a real machine whose clock is set wrong. The skew
in seconds is SWARMTRAIN_CHAOS_CLOCK_SKEW_S, or the number in the file SWARMTRAIN_CHAOS_CLOCK_FILE
(read again every quarter second, so a harness can move the clock of a running node).
(Debian's libfaketime 0.9.10 cannot do this for Python 3.11: with the monotonic clock left alone
time.sleep fails with EINVAL, libfaketime issue 426; with it faked, thread waits hang, issues 390
and 469.)
"""
import os
import time

_file = os.environ.get("SWARMTRAIN_CHAOS_CLOCK_FILE")
_fixed = float(os.environ.get("SWARMTRAIN_CHAOS_CLOCK_SKEW_S", "0") or 0)
if _file or _fixed:
    _time, _time_ns, _monotonic = time.time, time.time_ns, time.monotonic
    _state = [_fixed, float("-inf")]  # the skew, and when to read the file again (monotonic)

    def _skew() -> float:
        if _file and _monotonic() >= _state[1]:
            _state[1] = _monotonic() + 0.25
            try:
                with open(_file) as handle:
                    _state[0] = float(handle.read().strip() or 0)
            except (OSError, ValueError):
                pass  # a file being rewritten: the skew in force stays
        return _state[0]

    time.time = lambda: _time() + _skew()
    time.time_ns = lambda: _time_ns() + int(_skew() * 1e9)

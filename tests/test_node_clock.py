"""The clock check: a node whose clock is off says so, judged from its live peers' signed timestamps."""
from __future__ import annotations

from node.clock import ClockWatch


def watch() -> ClockWatch:
    return ClockWatch(tolerance_s=5.0, max_future_s=30.0, max_age_s=300.0)


def heartbeats(w: ClockWatch, peers, skew: float, now: float, lag: float = 0.5) -> None:
    """Each peer heartbeats; we read each one ``lag`` later, with our clock ``skew`` off."""
    for i in range(peers):
        for beat in (now - 2.0, now):  # two reads: the peer's records keep coming
            w.observe(bytes([i]), beat - lag - 0.1 * i, beat + skew)


def test_a_few_seconds_off_is_harmless_and_not_reported():
    w = watch()
    heartbeats(w, 3, skew=3.0, now=1000.0)
    assert abs(w.skew_s(1003.0) - 3.5) < 1e-9
    assert w.warning(1003.0) is None


def lasting(w: ClockWatch, start: float) -> str | None:
    """The warning once the skew has lasted 2 x the tolerance (10 s): a slow DHT is not a wrong clock."""
    assert w.warning(start) is None and w.warning(start + 9.0) is None
    return w.warning(start + 10.0)


def test_a_clock_far_ahead_or_behind_is_reported_once_it_lasts_and_once_a_minute():
    ahead = watch()
    heartbeats(ahead, 3, skew=60.0, now=1000.0)
    text = lasting(ahead, 1060.0)
    assert "60 s ahead" in text and "peers refuse its messages (more than 30 s in their future)" in text
    assert ahead.warning(1080.0) is None  # said once; again only a minute later
    heartbeats(ahead, 3, skew=60.0, now=1071.0)
    assert "60 s ahead" in ahead.warning(1131.0)
    behind = watch()
    heartbeats(behind, 2, skew=-400.0, now=1000.0, lag=0.0)
    text = lasting(behind, 600.0)
    assert "400 s behind" in text and "more than 300 s in their past" in text
    close = watch()
    heartbeats(close, 2, skew=-12.0, now=1000.0, lag=0.0)
    assert "peers judge it dead" in lasting(close, 988.0)


def test_records_late_for_a_few_seconds_are_not_a_wrong_clock():
    w = watch()
    heartbeats(w, 3, skew=0.0, now=1000.0, lag=8.0)  # the DHT is slow: every record 8 s old
    assert abs(w.skew_s(1000.0) - 8.0) < 1e-9 and w.warning(1000.0) is None
    heartbeats(w, 3, skew=0.0, now=1008.0)  # and then it is not
    assert w.warning(1009.0) is None and w.warning(1030.0) is None


def test_one_odd_peer_is_not_our_clock():
    w = watch()
    heartbeats(w, 2, skew=1.0, now=1000.0)
    for beat in (998.0, 1000.0):
        w.observe(b"odd", beat + 400.0, beat + 1.0)  # that peer's clock is off, not ours
    assert abs(w.skew_s(1001.0) - 1.5) < 1e-9 and w.warning(1001.0) is None


def test_silent_peers_are_dead_not_a_sign_of_our_clock():
    w = watch()
    for peer in (b"a", b"b", b"c"):
        for now in (1000.0, 1010.0, 1020.0):  # the same old records, read again and again
            w.observe(peer, 900.0, now)
    assert w.skew_s(1020.0) is None and w.warning(1020.0) is None
    heartbeats(w, 2, skew=0.0, now=1030.0)  # live ones again: their clock and ours agree
    assert w.warning(1030.0) is None


def test_only_the_last_minute_counts():
    w = watch()
    heartbeats(w, 2, skew=100.0, now=1000.0, lag=0.0)
    assert w.skew_s(1100.0) == 100.0
    assert w.skew_s(1200.0) is None  # what was read long ago says nothing about now

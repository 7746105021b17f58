"""What the status page's integration tests share: a pipeline swarm with status servers, Debian's
chromium under Playwright, a server-sent-events listener and a mosquitto broker, each cleaned up."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import Proc, wait_until

CHROMIUM = Path("/usr/bin/chromium")
MOSQUITTO = Path(shutil.which("mosquitto") or "/usr/sbin/mosquitto")
# Background networking, updates and sync off: the browser talks to 127.0.0.1 only.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions", "--metrics-recording-only"]


def missing_chromium() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (Debian package chromium; make test installs it as root with apt)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[dev]')"
    return None


def missing_mosquitto() -> str | None:
    if not MOSQUITTO.exists():
        return "mosquitto is not installed (Debian package mosquitto; make test installs it as root with apt)"
    return None


def status_url(proc: Proc, timeout: float = 90) -> str:
    out = proc.wait_for_output("status page: ", timeout)
    return re.search(r"status page: (\S+)", out).group(1)


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def node_ids(url: str) -> dict[str, str]:
    return {n["public_name"]: n["id"] for n in get_json(url + "api/v1/swarm")["nodes"]}


@dataclass
class EventStream:
    """Reads ``/api/v1/events`` in a thread; ``events`` holds (name, data) as they arrive."""

    url: str
    events: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._response = urllib.request.urlopen(self.url + "api/v1/events", timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        name = None
        try:
            for raw in self._response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
        except (OSError, ValueError, AttributeError):
            pass  # the server went away, or the test closed the stream under the reading thread

    def of(self, name: str) -> list[dict]:
        return [data for event, data in list(self.events) if event == name]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._response.close()


@contextlib.contextmanager
def chromium_page(profile: Path):
    """A page in Debian's chromium, headless, with a fresh profile; the browser is gone afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 1000})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            try:
                context.close()
            finally:
                _reap(profile)


def _reap(profile: Path) -> None:
    """Give the browser a few seconds to exit; kill what is left of it (only processes with our profile)."""
    deadline = time.monotonic() + 10
    while browser_pids(profile) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in browser_pids(profile):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def browser_pids(profile: Path) -> list[int]:
    """Processes whose command line names ``profile`` (the browser and its helpers)."""
    found = []
    marker = str(profile).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mosquitto(workdir: Path):
    """A broker of our own on 127.0.0.1 with its own config file; killed afterwards."""
    for _ in range(5):
        port = free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                          "log_dest stderr\nlog_type all\n")
        with open(workdir / "mosquitto.log", "wb") as log:
            proc = subprocess.Popen([str(MOSQUITTO), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

        def listening() -> bool:
            if proc.poll() is not None:
                return True
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10, 0.1, "mosquitto to listen")
        if proc.poll() is None:
            break
    else:
        raise AssertionError(f"mosquitto did not start: {(workdir / 'mosquitto.log').read_text(errors='replace')}")
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """wait_until that tolerates a predicate raising OSError (a server not up yet)."""
    def attempt():
        try:
            return predicate()
        except OSError:
            return None
    return wait_until(attempt, timeout, interval, what)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start

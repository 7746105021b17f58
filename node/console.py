"""What a person sees of a running node: on stdout the multiaddrs to share and each role it takes
with the reason, then its progress: a rich progress display on a terminal, otherwise a progress log
line every PROGRESS_EVERY_S (plain or JSON, as ``--log-format`` says)."""
from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from node.config import format_size

if TYPE_CHECKING:
    from node.roles import RoleChoice
    from node.runner import Node

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
TTY_REFRESH_S = 1.0


@dataclass(frozen=True)
class Progress:
    state: str
    role: str
    stage: int | None
    step: int
    total: int
    loss: float | None
    live_nodes: int  # the node itself included
    bytes_sent: int


def progress_of(node: "Node") -> Progress:
    live = sum(1 for key, m in node.view.members.items()
               if key != node.public_key and m.state in ("ONLINE", "JOINING"))
    loss = node.metrics.get("loss", node.metrics.get("val_loss"))
    return Progress(state=node.state.value, role=node.role.role.value if node.role else "joining",
                    stage=node.role.stage if node.role else None, step=int(node.step), total=node.spec.train.steps,
                    loss=loss, live_nodes=live + 1, bytes_sent=node.rpc.stats.sent if node.rpc else 0)


def _role_text(p: Progress) -> str:
    if p.role == "stage":
        return f"stage {p.stage}"
    return p.role + (f" stage {p.stage}" if p.stage is not None else "")


def format_progress(p: Progress) -> str:
    loss = f"loss {p.loss:.4f}" if p.loss is not None else "loss -"
    return (f"progress: {_role_text(p)}, step {p.step}/{p.total}, {loss}, {p.live_nodes} live nodes, "
            f"{format_size(p.bytes_sent)} sent, {p.state}")


def format_role(choice: "RoleChoice") -> str:
    if choice.role.value == "data":
        what = "data node (stage 0)"
    elif choice.role.value == "stage":
        what = f"stage {choice.stage}"
    else:
        what = choice.role.value + (f" stage {choice.stage}" if choice.stage is not None else "")
    return f"role: {what} — {choice.reason}"


class NodeConsole:
    """``tty`` None: a terminal on ``out`` gets the rich display, anything else (a pipe, a file,
    ``docker logs``) plain lines."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._console = None
        if self.tty:
            from rich.console import Console

            self._console = Console(file=self.out, highlight=False)

    def say(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False)
        else:
            print(text, file=self.out, flush=True)

    def addresses(self, maddrs: list[str]) -> None:
        self.say("this node's multiaddrs (others may use them as --initial-peers):")
        for maddr in maddrs:
            self.say(f"  {maddr}")

    def route_logs(self) -> None:
        """On a terminal, log lines go through the rich console, above the progress display."""
        if self._console is None:
            return
        from rich.logging import RichHandler

        root = logging.getLogger()
        level = root.level
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(RichHandler(console=self._console, show_path=False, markup=False, rich_tracebacks=False))
        root.setLevel(level)

    async def run(self, node: "Node", stop: asyncio.Event) -> None:
        """Until ``stop``: print each role the node takes (and why), and show progress."""
        if self._console is not None:
            await self._run_tty(node, stop)
        else:
            await self._run_plain(node, stop)

    def _announce_role(self, node: "Node", last: "RoleChoice | None") -> "RoleChoice | None":
        if node.role is not None and node.role != last:
            self.say(format_role(node.role))
        return node.role

    async def _run_plain(self, node: "Node", stop: asyncio.Event) -> None:
        role, loop = None, asyncio.get_running_loop()
        next_progress = loop.time() + PROGRESS_EVERY_S
        while not stop.is_set():
            role = self._announce_role(node, role)
            if loop.time() >= next_progress and node.online.is_set():
                next_progress = loop.time() + PROGRESS_EVERY_S
                logger.info("%s", format_progress(progress_of(node)))
            await _wait(stop, TTY_REFRESH_S)

    async def _run_tty(self, node: "Node", stop: asyncio.Event) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=self._console, transient=False, refresh_per_second=2)
        task = bar.add_task("joining", total=node.spec.train.steps, info="")
        role = None
        with bar:
            while not stop.is_set():
                role = self._announce_role(node, role)
                p = progress_of(node)
                loss = f"loss {p.loss:.4f}" if p.loss is not None else "loss -"
                bar.update(task, completed=min(p.step, p.total), description=_role_text(p),
                           info=f"{loss}  {p.live_nodes} live  {format_size(p.bytes_sent)} sent  {p.state}")
                await _wait(stop, TTY_REFRESH_S)
            p = progress_of(node)
            bar.update(task, completed=min(p.step, p.total))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass

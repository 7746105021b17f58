"""The optimizer's first import (torch._dynamo, seconds of CPU) runs off the node's event loop."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.harness import child_env

PROBE = textwrap.dedent("""
    import asyncio, sys, time
    import torch
    from trainer import warmup

    async def main(off_the_loop):
        ticks = 0
        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        before = ticks
        if off_the_loop:
            await warmup.ready()
        else:
            import torch._dynamo  # on the loop, as a first optimizer did
        task.cancel()
        print(ticks - before, "torch._dynamo" in sys.modules)

    asyncio.run(main(sys.argv[1] == "ready"))
""")


def _ticks_during_import(how: str) -> tuple[int, bool]:
    done = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert done.returncode == 0, done.stderr[-2000:]
    ticks, imported = done.stdout.split()
    return int(ticks), imported == "True"


def test_the_event_loop_runs_on_while_torch_dynamo_is_imported():
    ticks, imported = _ticks_during_import("ready")
    assert imported and ticks >= 10, ticks  # 10 ms ticks go on through the seconds the import takes
    # the same import on the loop stops every tick: what stalled the nodes' heartbeats
    ticks, imported = _ticks_during_import("inline")
    assert imported and ticks <= 1, ticks

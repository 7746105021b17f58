"""Files on disk are whole or absent: atomic writes under kill -9 and on a really full disk (a small
tmpfs), the commit log's append, and checkpoints and snapshots that are skipped, not half-written."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from protocol.keys import generate_private_key
from protocol.zo import open_contribution, seal_commit, seal_contribution
from tests.chaos.disk import SmallDisk, available as disks_available
from tests.harness import REPO
from trainer.files import atomic_path, save_safetensors, temporary_owner, torch_save, write_bytes, write_json
from trainer.pipeline.snapshots import save_snapshot
from trainer.recovery.checkpoint import save_checkpoint
from trainer.zo.log import CommitLog

RUN = bytes(range(16))
needs_root = pytest.mark.skipif(not disks_available(), reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk", size_mib=1)
    disk.mount()
    try:
        yield disk
    finally:
        disk.unmount()


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if temporary_owner(p.name) is not None]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("the writer died half way")
    assert json.loads(target.read_text()) == {"v": 1} and leftovers(tmp_path) == []
    save_safetensors(tmp_path / "w.safetensors", {"a": torch.arange(4.0)}, {"lr": "0.1"})
    torch_save(tmp_path / "s.pt", {"w": torch.ones(2)})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["a"], torch.arange(4.0))
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["w"], torch.ones(2))
    assert leftovers(tmp_path) == []


WRITER = """
import sys
from trainer.files import write_bytes
i = 0
while True:
    i += 1
    write_bytes(sys.argv[1], (str(i % 10) * (1 << 20)).encode())
"""


def test_kill_9_in_the_middle_of_writes_leaves_a_whole_file(tmp_path):
    """A process rewriting a 1 MiB file in a loop is killed at random moments: the file always holds
    one whole version, and a temporary file it leaves is named after its pid."""
    target = tmp_path / "blob"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for delay in (0.05, 0.13, 0.21):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env)
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:  # the child imports torch first
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        data = target.read_bytes()
        assert len(data) == 1 << 20 and len(set(data)) == 1, "a torn file"
        assert all(temporary_owner(name) == child.pid for name in leftovers(tmp_path))
        for name in leftovers(tmp_path):
            (tmp_path / name).unlink()


@needs_root
def test_a_full_disk_raises_a_named_error_and_keeps_the_old_files(small_disk):
    folder = small_disk.path
    save_safetensors(folder / "w.safetensors", {"a": torch.zeros(16)})
    torch_save(folder / "s.pt", {"w": torch.zeros(16)})
    write_bytes(folder / "r.json", b"{}")
    small_disk.fill()
    big = {"a": torch.zeros(1 << 18)}  # 1 MiB: does not fit
    for write in (lambda: save_safetensors(folder / "w.safetensors", big), lambda: torch_save(folder / "s.pt", big),
                  lambda: write_bytes(folder / "r.json", b"x" * (1 << 20))):
        with pytest.raises(OSError) as caught:
            write()
        assert caught.value.errno == errno.ENOSPC and caught.value.filename.startswith(str(folder))
    assert load_file(str(folder / "w.safetensors"))["a"].numel() == 16
    assert torch.load(folder / "s.pt", weights_only=True)["w"].numel() == 16
    assert (folder / "r.json").read_bytes() == b"{}" and leftovers(folder) == []


def _commit(log: CommitLog, committer, sender, padding: int = 0):
    contribs = [open_contribution(seal_contribution(sender, RUN, log.head_step, j, 7), RUN) for j in range(1 + padding)]
    return log.open(seal_commit(committer, RUN, log.head_step, log.head_hash, contribs))


@needs_root
def test_the_commit_log_never_keeps_a_torn_record_on_a_full_disk(small_disk):
    committer, sender = generate_private_key(), generate_private_key()
    path = small_disk.path / "commits.log"
    log = CommitLog(RUN, path=path, max_samples=64)
    for _ in range(3):
        log.append(_commit(log, committer, sender))
    size = path.stat().st_size
    small_disk.fill()
    with pytest.raises(OSError, match="cannot append step 3 to the commit log") as caught:
        log.append(_commit(log, committer, sender, padding=40))  # a record of a few KiB: needs a new page
    assert caught.value.filename == str(path)
    assert log.head_step == 3 and path.stat().st_size == size  # neither the log nor the file took it
    read, torn = CommitLog.read(path, RUN)
    assert torn == 0 and read.head_hash == log.head_hash
    small_disk.free()  # space again: the log goes on where it was
    log.append(_commit(log, committer, sender, padding=40))
    read, torn = CommitLog.read(path, RUN)
    assert (read.head_step, torn, read.head_hash) == (4, 0, log.head_hash)


@needs_root
def test_a_commit_log_larger_than_the_free_space_loads_and_its_torn_tail_is_cut_in_place(small_disk):
    """A zo node's log had grown past half its disk in a soak: every start rewrote the whole file,
    which no longer fit (ENOSPC), and the node could not come back."""
    committer, sender = generate_private_key(), generate_private_key()
    path = small_disk.path / "commits.log"
    log = CommitLog(RUN, path=path, max_samples=64)
    while path.stat().st_size < 600 << 10:  # 600 KiB of a 1 MiB disk
        log.append(_commit(log, committer, sender, padding=20))
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a crash in the middle of a record
    inode, size = path.stat().st_ino, path.stat().st_size
    loaded = CommitLog.load(path, RUN)
    assert (loaded.head_step, loaded.head_hash) == (log.head_step, log.head_hash)
    assert path.stat().st_ino == inode and path.stat().st_size == size - 8  # cut in place, not rewritten
    loaded.append(_commit(loaded, committer, sender))  # and it goes on from there
    assert CommitLog.read(path, RUN)[0].head_step == log.head_step + 1


@needs_root
def test_checkpoints_and_snapshots_are_skipped_with_a_log_line_on_a_full_disk(small_disk, caplog):
    state = {"w/x": torch.zeros(1 << 16)}
    small_disk.fill()
    with caplog.at_level(logging.WARNING):
        assert save_checkpoint(small_disk.path / "ck", 1, 5, state, 0.1) is None
        assert save_snapshot(small_disk.path / "sn", 1, 5, {"x": torch.zeros(1 << 16)}, 1.0) is None
    assert "checkpoint of stage 1 at iteration 5 not written: No space left on device" in caplog.text
    assert "weight snapshot of stage 1 at iteration 5 skipped: No space left on device" in caplog.text
    files = [p for p in small_disk.path.rglob("*") if p.is_file() and p.name != ".chaos-filler"]
    assert files == []
    small_disk.free()
    assert load_file(str(save_checkpoint(small_disk.path / "ck", 1, 5, state, 0.1)))["w/x"].numel() == 1 << 16

"""The commit log: every commit since the log's start, chained by hash, optionally kept in a file.

A log starts at step 0 from GENESIS (replayable from the base weights) or at a snapshot's step
from that snapshot's head hash. The file is a header (run id, start, prev) and then one
length-prefixed commit per record; a record torn by a crash is cut off when the file is read.
A record that cannot be written (a full disk) is cut off at once and the append raises, so the
file never holds a torn record in the middle.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from protocol import wire
from protocol.errors import ProtocolError
from protocol.zo import COMMIT_LIMITS, GENESIS, HASH_BYTES, Commit, CommitError, open_commit
from trainer.files import atomic_path

logger = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_MAGIC = b"swarmtrain-zo-log/1\n"


class LogFileError(ValueError):
    """A log file that belongs to another run or cannot be read."""


class CommitLog:
    def __init__(self, run_id: bytes, start: int = 0, prev: bytes = GENESIS, path: Path | None = None,
                 max_samples: int = 64):
        self.run_id = run_id
        self.start = start
        self.base_prev = prev
        # What the commit before ``start`` said, for a log that starts at a snapshot: who committed
        # it and how many nodes contributed (the next committer and quorum follow from them).
        self.base_committer: bytes | None = None
        self.base_contributors = 0
        self.base_banned: tuple[bytes, ...] = ()
        self.max_samples = max_samples
        self.commits: list[Commit] = []
        self.path = path
        if path is not None:
            self._write_header()

    # ---- state -------------------------------------------------------------------------------

    @property
    def head_step(self) -> int:
        """The next step to be committed (= number of steps applied)."""
        return self.start + len(self.commits)

    @property
    def head_hash(self) -> bytes:
        return self.commits[-1].hash if self.commits else self.base_prev

    def get(self, step: int) -> Commit | None:
        i = step - self.start
        return self.commits[i] if 0 <= i < len(self.commits) else None

    def since(self, step: int, limit: int) -> list[bytes]:
        """Raw commits from ``step`` on (at most ``limit``); empty if ``step`` is before our start."""
        if step < self.start:
            return []
        i = step - self.start
        return [c.raw for c in self.commits[i : i + limit]]

    @property
    def banned(self) -> tuple[bytes, ...]:
        """The nodes banned as of our head: the last commit's list (trainer/zo/bans.py)."""
        return self.commits[-1].banned if self.commits else self.base_banned

    def hash_at(self, step: int) -> bytes | None:
        """The chain hash after applying steps < ``step`` (what commit ``step`` must name as prev)."""
        if step == self.start:
            return self.base_prev
        c = self.get(step - 1)
        return c.hash if c is not None else None

    # ---- growth ------------------------------------------------------------------------------

    def open(self, raw: bytes) -> Commit:
        """Verify ``raw`` as a commit of this run (signatures, fields); the chain is not checked."""
        return open_commit(raw, self.run_id, self.max_samples)

    def check_next(self, commit: Commit) -> None:
        if commit.step != self.head_step:
            raise CommitError(f"commit of step {commit.step}, the log is at step {self.head_step}")
        if commit.prev != self.head_hash:
            raise CommitError(f"commit of step {commit.step} does not chain to this log's head (a fork)")

    def append(self, commit: Commit) -> None:
        """Add the next commit; with a file, it is on disk (fsynced) before it is in the log. Raises
        OSError naming the file when it cannot be written; the file and the log are unchanged then."""
        self.check_next(commit)
        if self.path is not None:
            self._append_record(commit)
        self.commits.append(commit)

    def _append_record(self, commit: Commit) -> None:
        assert self.path is not None
        record = memoryview(_LEN.pack(len(commit.raw)) + commit.raw)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                while record:
                    record = record[os.write(fd, record):]
                os.fsync(fd)
            except OSError as error:
                os.ftruncate(fd, size)  # frees blocks, so it works on a full disk too
                raise OSError(error.errno, f"cannot append step {commit.step} to the commit log: {error.strerror}",
                              str(self.path)) from None
        finally:
            os.close(fd)

    def restart_at(self, start: int, prev: bytes, committer: bytes | None = None, contributors: int = 0,
                   banned: tuple[bytes, ...] = ()) -> None:
        """Forget everything: the log continues from a snapshot at ``start`` whose head hash is ``prev``;
        ``committer``, ``contributors`` and ``banned`` describe the commit before it."""
        self.start, self.base_prev, self.commits = start, prev, []
        self.base_committer, self.base_contributors, self.base_banned = committer, contributors, tuple(banned)
        if self.path is not None:
            self._write_header()

    # ---- file --------------------------------------------------------------------------------

    def _write_header(self) -> None:
        assert self.path is not None
        header = wire.pack({"run": self.run_id, "start": self.start, "prev": self.base_prev,
                            "committer": self.base_committer, "contributors": self.base_contributors,
                            "banned": list(self.base_banned)})
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            f.write(_MAGIC + _LEN.pack(len(header)) + header)
            for c in self.commits:
                f.write(_LEN.pack(len(c.raw)) + c.raw)

    @classmethod
    def read(cls, path: Path, run_id: bytes, max_samples: int = 64) -> tuple["CommitLog", int]:
        """Read a log file without changing it, verifying every commit and the chain: the log (with
        no file attached) and the number of bytes of a torn or bad tail that it left out."""
        data = Path(path).read_bytes()
        if not data.startswith(_MAGIC):
            raise LogFileError(f"{path} is not a swarmtrain zo commit log")
        pos = len(_MAGIC)
        try:
            (n,) = _LEN.unpack_from(data, pos)
            header = wire.unpack(data[pos + 4 : pos + 4 + n], max_bytes=1 << 16)  # a banned list can be 32 KiB
            start = wire.require_int(header["start"], "start", 0)
            prev = wire.require_bytes(header["prev"], "prev", length=HASH_BYTES)
        except (ProtocolError, KeyError, TypeError, struct.error) as error:
            raise LogFileError(f"{path}: unreadable header ({error})") from None
        if header["run"] != run_id:
            raise LogFileError(f"{path} is the log of another run")
        log = cls(run_id, start, prev, None, max_samples)
        committer, contributors = header.get("committer"), header.get("contributors", 0)
        if isinstance(committer, bytes) and len(committer) == 32:
            log.base_committer = committer
        if type(contributors) is int and contributors >= 0:
            log.base_contributors = contributors
        banned = header.get("banned", [])
        if isinstance(banned, list) and all(isinstance(b, bytes) and len(b) == 32 for b in banned):
            log.base_banned = tuple(banned)
        pos += 4 + n
        while pos < len(data):
            if pos + 4 > len(data):
                break
            (n,) = _LEN.unpack_from(data, pos)
            raw = data[pos + 4 : pos + 4 + n]
            if len(raw) != n or n > COMMIT_LIMITS.max_bytes:
                break
            try:
                log.append(log.open(raw))
            except ProtocolError as error:
                logger.warning("commit log %s: stopping at step %d: %s", path, log.head_step, error)
                break
            pos += 4 + n
        return log, len(data) - pos

    @classmethod
    def load(cls, path: Path, run_id: bytes, max_samples: int = 64) -> "CommitLog":
        """Read a log file, verifying every commit and the chain; a torn or bad tail is cut off in
        place. (Rewriting the file, as it once did on every start, needs the log's size again in
        free space: a zo node of a soak, its log grown to half its disk, could not start again.)"""
        log, dropped = cls.read(path, run_id, max_samples)
        log.path = Path(path)
        if dropped:
            logger.warning("commit log %s: dropped a torn tail after step %d", path, log.head_step)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - dropped)  # frees blocks: works on a full disk too
                os.fsync(fd)
            finally:
                os.close(fd)
        return log

"""A small disk that the harness fills and frees at run time: a tmpfs mounted over a node's folder
(its data dir, report and snapshots), so that a node meets a real ENOSPC from the kernel."""
from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

FILLER = ".chaos-filler"


def available() -> bool:
    """Root can mount a tmpfs (a container may forbid mounts)."""
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0


@dataclass
class SmallDisk:
    path: Path
    size_mib: int = 16
    mounted: bool = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m,mode=0755", "tmpfs", str(self.path)],
                       check=True, capture_output=True, timeout=30)
        self.mounted = True

    def fill(self) -> int:
        """Write a filler file until the disk is full; returns the bytes it took."""
        written = 0
        block = b"\0" * (1 << 16)
        fd = os.open(self.path / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
                written += n
            while True:  # the last partial page too
                try:
                    written += os.write(fd, b"\0")
                except OSError:
                    break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        try:
            (self.path / FILLER).unlink()
        except FileNotFoundError:
            pass

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)
            self.mounted = False

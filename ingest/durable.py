"""Files written whole or not at all: a draft beside the file, synced, then renamed over it, so a
crash leaves the old content or the new one, never a mix (the dead-letter's rewrite, the markers
an erasure leaves for the next command); and the lock files processes share such files by.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def replace_whole(path: Path, chunks: Iterable[bytes], suffix: str = ".new") -> None:
    """Writes `chunks` as the file's whole content, then syncs the directory too, so that a crash
    right after finds the new file under its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(path.name + suffix)
    with open(draft, "wb") as out:
        out.writelines(chunks)
        out.flush()
        os.fsync(out.fileno())
    os.replace(draft, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Holds the lock file `lock` (made if missing) against every other process that takes it:
    a file of its own, whose inode stays while the files it guards are replaced. The system
    releases it with a process that dies."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)

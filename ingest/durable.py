"""Files written whole or not at all: a draft beside the file, synced, then renamed over it, so a
crash leaves the old content or the new one, never a mix (the dead-letter's rewrite, the markers
an erasure leaves for the next command)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


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

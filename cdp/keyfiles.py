"""Key files that a process creates on first use (the master key of the stored personal data, the
key of destination secrets): one recipe, so both are made owner-only and atomically, and two
processes starting at once agree on one key instead of overwriting each other's."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

KEY_BYTES = 32


def read_or_create(path: Path, encode: Callable[[bytes], str]) -> str:
    """The text of the key file `path`; missing, it is created with a new random key (mode 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it in between: use theirs
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(encode(os.urandom(KEY_BYTES)) + "\n")
    return path.read_text().strip()

"""Atomic file writes: the data goes to a temporary file beside the target, then one rename
makes it visible, so a killed process never leaves a half-written file (or a stale .tmp)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

# mkstemp creates its file 0600, which the rename would keep: outputs others on the machine
# could not read. New files get what open() would give them. Read once: umask can only be read
# by setting it, which is not safe to do while other threads create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file in path's folder (created if needed), then
    rename it to path; on failure the temporary file is removed and the target is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

"""Atomic file writes: nothing half-written is ever visible under the final name."""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file in path's folder, fsync it, then rename it to path.

    On any failure (a full disk, Ctrl-C, a crash in `write`) the temp file is removed and
    the previous file at `path`, if any, is untouched. A process killed outright (SIGKILL,
    power loss) can leave the temp file `.<name>.<random>.tmp` behind, never a partial
    `path`; `remove_stale_temps(path)` clears those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not openable as a folder here (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed `atomic_write(path, ...)` left; returns what it removed.

    Only for a `path` no other process is writing at the moment.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if tmp.name[len(path.name) + 2:-4] and not tmp.is_dir():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed

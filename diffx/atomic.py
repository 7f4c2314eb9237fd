"""Atomic writes: a file or a folder appears whole or not at all, and an interrupted write (a kill,
a full disk, a power cut) leaves the previous one intact.

One module for every write that must not be seen half-done: checkpoints, PNGs and reports
(``atomic_write``), the resume state and the dataset cache (``atomic_dir``). Imports nothing from
diffx, so any module may use it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

# During a replacing ``atomic_dir`` the previous folder waits at ``<name>.old`` until the new one is
# in place; readers that find no ``<name>`` fall back to it (see ``diffx.resume``).
OLD_SUFFIX = ".old"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``: a crash or a full disk
    leaves the previous file intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)  # and the rename itself survives a power cut


def atomic_dir(path: Path, fill, replace: bool) -> None:
    """Call ``fill(tmp_folder)`` on a sibling temp folder, flush its files to disk, then move it to
    ``path``, so readers never see a half-filled folder.

    replace=True swaps out an existing folder with two renames: the old one first moves to
    ``<name>.old`` (``OLD_SUFFIX``) and is deleted only once the new one is in place, so at every
    instant ``<name>`` or ``<name>.old`` holds a complete folder. replace=False leaves an existing
    folder alone: a concurrent writer that moved its own in first has won, and this copy is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random part: concurrent writers, in this process or others, never share a temp folder
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fill(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())  # the contents are on disk before the name points at them
        if replace:
            _swap_in(tmp, path)
        else:
            os.rename(tmp, path)
    except OSError:
        if replace or not path.exists():  # a concurrent writer that won the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace the folder ``path`` by ``tmp`` with two renames; an ``.old`` left alone by a crash
    between the renames is the only good copy: it goes only once ``path`` exists again."""
    old = path.with_name(path.name + OLD_SUFFIX)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the new name is durable before the old copy goes
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk, so that a rename into it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

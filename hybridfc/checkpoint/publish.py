"""A save is complete or invisible.

Every rank writes into the staging directory ``<save_dir>/<tag>.partial``; once all are done one
rank calls :func:`publish`: it fsyncs the staging directory, makes it ``<tag>`` and only then
points ``latest`` at it (a temporary file, fsynced, renamed). Re-saving an existing ``tag``
swaps the two directories in one step (``renameat2(RENAME_EXCHANGE)``), so ``latest`` never names
a missing directory; where the filesystem cannot swap, the old ``tag`` is moved aside first, and a
run killed between the two renames finds it as ``<tag>.replaced``. A save interrupted at any
stage leaves the previous checkpoint, and ``latest``, as they were. :data:`SAVE_STAGE_HOOK` (in
:mod:`hybridfc.checkpoint`) lets tests stop a rank at each stage.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Optional

STAGING_SUFFIX = ".partial"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def reached(stage: str) -> None:
    """Report a save's stage to :data:`hybridfc.checkpoint.SAVE_STAGE_HOOK`, if one is set."""
    from hybridfc import checkpoint

    if checkpoint.SAVE_STAGE_HOOK is not None:
        checkpoint.SAVE_STAGE_HOOK(stage)


def staging_tag(tag: str) -> str:
    """The directory name a save of ``tag`` is written under until it is complete."""
    return tag + STAGING_SUFFIX


def latest_tag(load_dir: "str | os.PathLike") -> Optional[str]:
    """The tag ``load_dir/latest`` names, or None."""
    path = Path(load_dir) / "latest"
    return path.read_text().strip() if path.is_file() else None


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")) + [directory]:
        _fsync(path)


def exchange(first: Path, second: Path) -> bool:
    """Swap two directory entries in one step; False where the system or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"renameat2({first}, {second}, RENAME_EXCHANGE): {os.strerror(code)}")


def _replace_directory(staging: Path, final: Path) -> None:
    """Make ``staging`` ``final``, which exists: swapped in one step where possible."""
    if exchange(staging, final):
        shutil.rmtree(staging)      # now the old tag's files
        return
    retired = final.with_name(final.name + ".replaced")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired)


def publish(save_dir: "str | os.PathLike", tag: str, save_latest: bool = True) -> Path:
    """Make the complete staging directory of ``tag`` the checkpoint ``tag`` (one rank calls it):
    fsync, rename over any older ``tag``, then, with ``save_latest``, point ``latest`` at it."""
    save_dir = Path(save_dir)
    staging, final = save_dir / staging_tag(tag), save_dir / tag
    _fsync_tree(staging)
    if final.exists():
        _replace_directory(staging, final)
    else:
        os.replace(staging, final)
    _fsync(save_dir)
    reached("renamed")
    if save_latest:
        latest = save_dir / "latest.tmp"
        with open(latest, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest, save_dir / "latest")
        _fsync(save_dir)
        reached("latest_written")
    return final

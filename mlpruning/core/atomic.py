"""Atomic file and folder writes: nothing half-written is ever left under a final name.

Every artifact is first written to a temporary sibling (same folder, so ``os.replace`` stays on
one file system and is atomic on POSIX) and renamed once complete. A crash leaves at most a
``*.tmp`` file or folder behind, which the next write replaces.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlpruning.core.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unwritable(path: Path, exc: OSError) -> UserError:
    """The one-line error for an output path the OS refuses (permissions, a file in the way, a full disk)."""
    reason = exc.strerror or exc.__class__.__name__
    return UserError(f"cannot write {path} ({reason}): choose another output path or free it")


def check_writable_dir(folder: Path) -> None:
    """Prove ``folder`` can be created and written (a probe file in it, or in its nearest existing
    ancestor) before hours of training; creates nothing that stays."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder: choose another output path")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise unwritable(folder, exc) from None


def make_writable_dir(folder: Path) -> None:
    """``mkdir -p`` with the checks and the one-line error of :func:`check_writable_dir`."""
    check_writable_dir(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(folder, exc) from None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise unwritable(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp creates 0600; give the final file the usual umask mode
            os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, path)
        except OSError as exc:  # e.g. a folder where the file should go
            raise unwritable(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def staging_dir(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success move each file in it into ``final_dir``.

    Files are moved one by one with ``os.replace`` (each move is atomic), so readers of
    ``final_dir`` see every file either complete or absent. Callers write the file that marks
    completion (for example ``eval.json``) after the others.
    """
    created = not final_dir.exists()
    make_writable_dir(final_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=final_dir))
    done = False
    try:
        yield tmp
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                dest = final_dir / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not done and not any(final_dir.iterdir()):
            final_dir.rmdir()  # a failed first write leaves no empty output folder behind

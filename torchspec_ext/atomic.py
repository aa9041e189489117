"""Writing a file or a folder so that readers see the old one or the new one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file or a folder to; when the block ends
    without an error it replaces ``path`` in one rename (a folder: the old one is moved aside
    first and removed after, and put back if the rename fails). On an error, or a kill before
    the rename, ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not (tmp.is_dir() and path.is_dir()):
            os.replace(tmp, path)
            return
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path)
            raise
        _remove(old)
    finally:
        _remove(tmp)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, all or nothing."""
    with staged(path) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def make_readable(directory: Path) -> None:
    """Gives ``directory`` and the files in it the modes ``mkdir`` and ``open`` give under the umask
    (safetensors writes its files 0600, a staged folder is made 0700 by nobody's choice)."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)

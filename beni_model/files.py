"""Atomic writes: a file or folder appears complete under its name, or not at all, whenever the writer is killed.

The one write-then-rename helper of the project: the data assets, the trainer's checkpoints and the model caches
all write through `atomic_path`."""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yields a hidden sibling of `path` to write (a file, or a folder to fill); when the block ends without an
    error it is renamed to `path`, else removed. The temp name is unique per call, so two writers never share one.

    A file replaces an existing one in one rename. A folder cannot replace a non-empty folder atomically: with
    `replace`, the old folder is first renamed aside and removed after the swap, so a kill between the two renames
    leaves no `path` (never a half-written one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if replace and _folder(tmp) and _folder(path):
        old = tmp.with_name(tmp.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if _folder(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _folder(path: Path) -> bool:
    """A real folder: a link to one is swapped and removed as a link."""
    return path.is_dir() and not path.is_symlink()


def remove_leftovers(path: str | Path) -> None:
    """Remove the temp siblings that killed writers of `path` left behind. Call it only where no other writer of
    `path` can be running (under the writer's lock, or where the caller is the only writer)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp*"):
        _remove(tmp)

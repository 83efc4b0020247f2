"""Writing a run's outputs so that a crash or another local user cannot harm them.

- :func:`atomic_write`: a file written whole or not at all (temp file, fsync, rename, fsync of
  the directory), readable by its owner only.
- :func:`replace_dir`: a directory written aside and swapped in whole (``model/``).
- :func:`private_dir` / :func:`make_private`: directories 0700 and files 0600 whatever the
  umask, so that node data, messages and logs are the owner's alone.
- :class:`RunLock`: one run at a time per output directory (``OUT/.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

LOCK_FILE = ".lock"


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter: created 0700 (with its missing
    parents), an existing one narrowed to 0700."""
    path = Path(path)
    for directory in reversed([p for p in (path, *path.parents) if not p.exists()]):
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask
    path.chmod(0o700)  # an existing one keeps its own
    return path


def make_private(path: Path) -> None:
    """Narrow ``path`` to its owner: a file to 0600; a directory, and all it holds, to 0700
    (directories) and 0600 (files)."""
    path = Path(path)
    if not path.is_dir():
        path.chmod(0o600)
        return
    path.chmod(0o700)
    for root, directories, files in os.walk(path):
        for name in directories:
            (Path(root) / name).chmod(0o700)
        for name in files:
            (Path(root) / name).chmod(0o600)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (0600) and fsync it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably, readable by its owner only: a
    crash leaves the old content or the new, never part of either."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _sync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (deepest first), narrowed to its owner."""
    make_private(path)
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            descriptor = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_dir(Path(root))


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Replace directory ``target`` whole: ``write(staging)`` fills a sibling directory, which is
    synced and swapped in; the old ``target`` is removed only then. If ``write`` fails, the old
    ``target`` is left as it was."""
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    old = target.with_name(target.name + ".old")
    if old.exists() and not target.exists():  # a crash mid-swap: the old one is whole
        old.rename(target)
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    private_dir(staging)
    try:
        write(staging)
        _sync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        target.rename(old)
    staging.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


class OutputInUse(RuntimeError):
    """Another process holds the output directory's lock."""


class RunLock:
    """An exclusive lock on an output directory (``flock`` on ``OUT/.lock``), held while a run
    writes to it; the OS releases it when the process ends, crash included. Another process is
    refused at once with :class:`OutputInUse`; within the holding process it nests (``fedrec
    simulate`` holds it, and the federation it runs takes it again)::

        with RunLock(out):
            ...  # the run
    """

    _held: ClassVar[dict[Path, list[int]]] = {}  # this process's locks: path -> [fd, depth]

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE

    def __enter__(self) -> RunLock:
        self.created = not self.out.exists()  # a run refused early leaves no OUT behind
        key = private_dir(self.out).resolve() / LOCK_FILE
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            return self
        descriptor = os.open(key, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise OutputInUse(
                f"{self.out} is in use by another fedrec run (pid {holder}, lock {self.path}): "
                "wait for it to end, or use another --out"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        RunLock._held[key] = [descriptor, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        key = self.out.resolve() / LOCK_FILE
        held = RunLock._held[key]
        held[1] -= 1
        if held[1] == 0:
            del RunLock._held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(held[0], 0)
            os.close(held[0])  # closing releases the lock
            if self.created and {p.name for p in self.out.iterdir()} == {LOCK_FILE}:
                key.unlink()  # nothing was written: leave no OUT (a refused run)
                self.out.rmdir()

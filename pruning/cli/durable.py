"""Writes that survive signals and, where the OS allows, power loss: fsync, signals held across a rename swap,
and one lock per output directory so that two runs never write one target.

POSIX only (``fcntl``); elsewhere the lock is a no-op and the rest still applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("pruning")

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def fsync_path(path: Path) -> None:
    """Flush one file or directory to stable storage (a directory: its entries, e.g. after a rename)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on this platform
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # a filesystem without fsync (some network or FUSE mounts): nothing more can be done
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """Every file under ``directory``, then every directory bottom-up, ``directory`` itself last."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(directory)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_tree_to_umask(directory: Path) -> None:
    """Files 0666 and directories 0777, less the umask: what a plain ``open``/``mkdir`` would have made (writers
    such as safetensors or ``mkdtemp`` make 0600/0700)."""
    mask = umask()
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    directory.chmod(0o777 & ~mask)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are held and delivered when it ends, so a rename swap
    is never cut in half by Ctrl-C or a scheduler. Only the main thread receives signals: elsewhere nothing
    is held (and nothing needs to be)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: pending.append(signum)) for sig in HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])  # the handler of before runs now (the CLI's raises)


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def target_locked(target: Path, what: str = "--save_model") -> Iterator[None]:
    """Hold an exclusive lock on ``target`` for the block (a hidden sibling lock file, removed afterwards), or
    refuse at once when another run holds it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = lock_path(target)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ValueError(
                f"{what} {str(target)!r} is being written by another run (it holds {str(path)!r}); wait for that "
                "run to finish or choose another directory"
            ) from None
        try:  # the file may have been removed by the run that held it just before: lock the one at the path
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a run that opened it meanwhile sees the inode change and retries
        os.close(descriptor)


def staging_siblings(target: Path) -> tuple[list[Path], list[Path]]:
    """(new models being written, previous models being replaced) that runs into ``target`` left beside it."""
    parent = target.parent
    partial = sorted(parent.glob(f".{target.name}.partial-*"))
    old = sorted(parent.glob(f".{target.name}.old-*"))
    return partial, old


def clear_stale_staging(target: Path) -> None:
    """Call with the target's lock held: no other run is writing, so what is beside ``target`` was left by a killed
    one. With ``target`` in place, those are an unfinished new model or a replaced one whose removal was cut
    short: removed, and named in the log. Without it, a run was killed between the renames of a swap (a kill -9 or
    power loss; signals are held there): they may be the only copies, so they are named, never removed."""
    partial, old = staging_siblings(target)
    if not partial and not old:
        return
    if target.exists():
        for path in partial + old:
            shutil.rmtree(path, ignore_errors=True)
        log.warning("removed what a killed run left beside %s: %s", target, ", ".join(p.name for p in partial + old))
        return
    log.warning(
        "%s is missing, and a run killed while replacing it left %s (its previous model) and %s (the new one, "
        "possibly incomplete): move the one you want to %s",
        target, ", ".join(map(str, old)) or "nothing", ", ".join(map(str, partial)) or "nothing", target,
    )  # fmt: skip

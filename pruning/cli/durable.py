"""Writes that survive signals and, where the OS allows, power loss: fsync, signals held across a rename swap,
and one lock per output directory so that two runs never write one target.

POSIX only (``fcntl``); elsewhere the lock is a no-op and the rest still applies.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from pruning import checksums

log = logging.getLogger("pruning")

# Every signal whose default would end the process and that can be caught (SIGKILL cannot).
HELD_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGXCPU")
    if hasattr(signal, name)
)  # fmt: skip


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
    """Signals that arrive inside the block (SIGINT, SIGTERM, SIGHUP, ...) are held, and the first is delivered
    when it ends, so a rename swap is never cut in half by Ctrl-C, a scheduler or a dropped terminal. Only the main
    thread receives signals: elsewhere nothing is held (and nothing needs to be)."""
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
        except OSError as err:  # a filesystem without locks (Lustre without -o flock, some FUSE/CIFS mounts)
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(descriptor)
                raise
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.unlink(path)
            log.warning("cannot lock %s on this filesystem (%s): two runs into it would not be kept apart", path,
                        err.strerror)  # fmt: skip
            yield
            return
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
    name = glob.escape(target.name)
    return sorted(target.parent.glob(f".{name}.partial-*")), sorted(target.parent.glob(f".{name}.old-*"))


def remove(path: Path) -> None:
    """A directory tree, or the link itself when ``path`` is a symlink."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def keep_visible(staging: Path, target: Path) -> Path:
    """A finished model that cannot go to ``target`` gets a visible name of its own (never cleared as stale)."""
    kept = target.with_name(f"{target.name}.pruned-{staging.name.rsplit('-', 1)[-1]}")
    staging.rename(kept)
    return kept


def clear_stale_staging(target: Path) -> list[str]:
    """Call with the target's lock held: no other run is writing, so what is beside ``target`` was left by a killed
    one. With ``target`` in place, those are an unfinished new model or a replaced one whose removal was cut
    short: removed. Without it, a run was killed between the two renames of a swap (a kill -9 or a power loss:
    signals are held there): the previous model is put back at ``target``, and a new one that verifies complete
    (its checksums) is kept under a visible name. Returns what was done, one sentence each (also logged)."""
    partial, old = staging_siblings(target)
    done = []
    if not target.exists() and old:
        newest = max(old, key=lambda p: p.lstat().st_mtime)
        newest.rename(target)
        fsync_path(target.parent)
        old.remove(newest)
        done.append(f"put the previous model back at {target} from {newest.name}, left by a run killed mid-swap")
    if done or not target.exists():  # a killed run's new model that is complete may be the only copy of it
        for path in list(partial):
            if path.is_dir() and checksums.verify(path).ok:
                kept = keep_visible(path, target)
                partial.remove(path)
                done.append(f"kept the complete new model of a killed run as {kept}")
    removed = []
    for path in partial + old:
        try:
            remove(path)
            removed.append(path.name)
        except OSError as err:
            done.append(f"could not remove {path} ({err.strerror or err})")
    if removed:
        done.append(f"removed what a killed run left beside {target}: {', '.join(removed)}")
    for sentence in done:
        log.warning("%s", sentence)
    return done

"""Memory before work: what a pruning run will need beyond the loaded model, and what this process may still take.

Host memory available is the least of ``/proc/meminfo``'s MemAvailable, the cgroup's limit less its usage (v2 or
v1), and ``RLIMIT_AS`` less the address space in use. Estimates count the tensors the run keeps alive at once;
the allocator's own slack and fragmentation are not modelled, so a run that passes may still be close.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30


@dataclass(frozen=True)
class HostMemory:
    available: int | None  # bytes, None when nothing bounds it that we can read
    bound: str  # which limit gives it


def _kib_field(path: str, field: str) -> int | None:
    """A ``Name:  123 kB`` line of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat_field(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == field and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


# (limit, usage, stat, the stat's inactive page cache): cgroup v2, then v1
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)  # fmt: skip


def _cgroup_room() -> int | None:
    """The cgroup's limit less its usage, not counting inactive page cache (the kernel reclaims it first)."""
    for limit_file, usage_file, stat_file, cache_field in CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for "none"
            return max(0, limit - max(0, usage - _stat_field(stat_file, cache_field)))
    return None


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    in_use = _kib_field("/proc/self/status", "VmSize")
    return None if in_use is None else max(0, soft - in_use)


def host_memory() -> HostMemory:
    """What this process may still allocate in host RAM, and which limit says so."""
    candidates = [
        (_kib_field("/proc/meminfo", "MemAvailable"), "MemAvailable in /proc/meminfo"),
        (_cgroup_room(), "the cgroup's memory limit"),
        (_address_space_room(), "RLIMIT_AS (ulimit -v)"),
    ]
    known = [(room, bound) for room, bound in candidates if room is not None]
    if not known:
        return HostMemory(None, "nothing readable")
    room, bound = min(known)
    return HostMemory(room, bound)


def size(n_bytes: int) -> str:
    """Bytes for a message: GiB from 1 GiB up, MiB below."""
    return f"{n_bytes / GiB:.1f} GiB" if n_bytes >= GiB else f"{n_bytes / (1 << 20):.1f} MiB"

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


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for "none"
            return max(0, limit - usage)
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


def gib(n_bytes: int) -> str:
    return f"{n_bytes / GiB:.1f} GiB"

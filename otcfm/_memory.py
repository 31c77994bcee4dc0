"""Memory checks before dense solves: a problem that will not fit raises MemoryError instead of aborting the process."""

from __future__ import annotations

__all__ = ["available_bytes", "check_dense_fits"]


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    """Bytes left under this process's address-space limit (``ulimit -v``), or None without a limit."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        return None
    return max(limit - used, 0)


def available_bytes() -> int | None:
    """Memory a new allocation can use: the smaller of the free memory and the address-space limit left.

    None when neither is known (not Linux): the checks below then let the solve run.
    """
    known = [b for b in (_meminfo_available(), _address_space_left()) if b is not None]
    return min(known) if known else None


def check_dense_fits(n0: int, n1: int, bytes_per_entry: int, what: str) -> None:
    """Raise MemoryError if a solve needing ``bytes_per_entry`` bytes per entry of an ``(n0, n1)`` matrix will not fit.

    Args:
        n0, n1: the problem's batch sizes.
        bytes_per_entry: peak bytes per cost entry of the solve (cost, solver state, plan).
        what: the solve, named in the message (e.g. ``"exact OT (network simplex)"``).
    """
    need = n0 * n1 * bytes_per_entry
    free = available_bytes()
    if free is not None and need > free:
        raise MemoryError(
            f"{what} of a {n0}x{n1} batch needs about {need / 2**30:.1f} GiB, but {free / 2**30:.1f} GiB are "
            f"available; use smaller batches, or a coupler that keeps no dense matrix"
        )

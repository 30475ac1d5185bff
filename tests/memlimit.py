"""A cap on this process's address space, so a test that would allocate gigabytes fails with MemoryError
instead of swapping or being OOM-killed (Linux: RLIMIT_AS, measured from /proc/self/status)."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

GB = 1 << 30


def vm_size() -> int:
    """Bytes of address space this process has mapped now (VmSize)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc to measure the address space")
    for line in status.read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_cap(extra: int = 2 * GB) -> Iterator[None]:
    """Allow `extra` bytes of address space beyond what is mapped now; restore the old limit afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

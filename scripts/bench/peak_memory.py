"""Peak resident memory of this process, for benchmarks that run each mode in a child process."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """VmHWM: the high-water mark of this process's own address space. getrusage's ru_maxrss is not used where
    /proc exists because on Linux it survives fork + exec, so a child would report its parent's peak as a floor."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

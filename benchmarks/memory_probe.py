"""Peak-memory probes shared by the benchmark scripts (Linux ``/proc``, glibc).

>>> release_free_heap(); baseline = rss_bytes()
>>> exact = reset_hwm(); sampler = RssSampler(); sampler.start()
>>> ...                                              # the work being measured
>>> sampled_peak = sampler.stop() - baseline
>>> kernel_peak = hwm_bytes() - baseline if exact else None
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import psutil


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """The resident set size now."""
    return _status_bytes("VmRSS")


def hwm_bytes() -> int:
    """The kernel's RSS high-water mark (since exec, or since :func:`reset_hwm`)."""
    return _status_bytes("VmHWM")


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Collect garbage and give glibc's free heap memory back to the OS, so that memory freed
    before a baseline or a measurement is not counted."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssSampler(threading.Thread):
    """Reads the process's RSS every ``period`` seconds and keeps the largest value (a cross-check
    of :func:`hwm_bytes`: it can miss a short peak, never over-reports)."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.process, self.period, self.peak = psutil.Process(), period, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period)

    def stop(self) -> int:
        """Stop sampling; the largest RSS seen, in bytes."""
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)

"""How much CPU time other processes take on this process's cores while it measures something.

Micro-benchmarks timed while another process keeps a core busy run slow (on 2 cores an OpenMP
team waits for its descheduled thread at every barrier: 2-4x), and a cost model cached from
them stays wrong. `OtherLoad` reads the kernel's per-core counters (/proc/stat, the cores in
this process's affinity set, hypervisor steal included) and this process's own CPU time around
a block: the difference is what everything else used, in cores. Where /proc/stat is missing
(not Linux) the load is unknown (None) and callers treat the machine as quiet.
"""
from __future__ import annotations

import os
import resource
import time

# Other processes using at least this many cores on ours make a measurement "busy".
BUSY_CORES = 0.25
# /proc/stat counts in clock ticks (10 ms): over a shorter block one tick of anyone's work reads
# as a busy core, so the load of a block shorter than this is unknown (None).
MIN_SECONDS = 0.1
_STAT = "/proc/stat"


def _our_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_seconds(cpus: set[int] | None) -> float | None:
    """CPU seconds spent not idle on `cpus` (all cores if None) since boot, by anyone."""
    try:
        with open(_STAT) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        values = [int(v) for v in fields[:8]]
        busy += sum(values) - values[3] - values[4]
    return busy / ticks


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Context manager: `cores` = average cores other processes used on ours during the block
    (None where it cannot be read, or the block lasted under MIN_SECONDS: the kernel counts in
    10 ms ticks)."""

    def __init__(self) -> None:
        self.cores: float | None = None
        self._cpus = _our_cpus()

    def __enter__(self) -> "OtherLoad":
        self._start = (time.perf_counter(), _busy_seconds(self._cpus), _own_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, _busy_seconds(self._cpus), _own_seconds() - own0
        if busy0 is None or busy is None or wall < MIN_SECONDS:
            return
        self.cores = round(max(busy - busy0 - own, 0.0) / wall, 3)

    @property
    def busy(self) -> bool:
        return self.cores is not None and self.cores >= BUSY_CORES

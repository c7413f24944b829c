"""How many CPUs this process may run on (its affinity mask on Linux, where a container or `taskset` can give it
fewer than the machine has). No torch import: the quickstart's launcher reads it before any training starts."""

from __future__ import annotations

import os


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

"""How many CPU threads torch should use: one per physical core, fewer when the machine is already
busy. OpenMP threads that compete for cores with other processes slow a run down several times (the
README has figures), so the default never asks for more cores than the load average leaves free.
Free of torch imports at module level: the CLI's parser reads it."""
import os
from typing import Optional

THREADS_HELP = ("CPU threads (default: one per physical core, fewer when the load average says other processes "
                "keep cores busy; OMP_NUM_THREADS when set)")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once), from Linux's sysfs
    topology; elsewhere the logical CPU count."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def default_num_threads() -> int:
    """``OMP_NUM_THREADS`` when set (torchrun sets it per process); otherwise the physical cores
    minus the cores the 1-minute load average says other processes keep busy, at least one."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = physical_cores()
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


def set_num_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`default_num_threads`) and its
    inter-op threads to one, so nested parallelism cannot multiply the count (the detectors fork no
    inter-op work); returns the intra-op count."""
    import torch

    threads = threads or default_num_threads()
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # torch allows it once, before any inter-op work: keep what is set
            pass
    return threads

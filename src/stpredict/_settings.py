"""Global settings: device, threads, verbosity, progress bars, seeds; and the thread pools sized from them.

Thread pools
------------
stpredict runs work on three pools: torch's intra-op threads (OpenMP, also used by MKL and oneDNN), numba's kernel
threads and dask's threaded scheduler. :func:`limit_threads`, called at the start of every fit and of
:func:`stpredict.tl.predict_dense`, sizes all three to one number, :func:`n_threads`: ``settings.n_jobs``, else
``OMP_NUM_THREADS``, else the cores this process may use (:func:`usable_cores`: its CPU affinity and its cgroup CPU
quota, which ``os.cpu_count()`` and torch ignore, so on a 64-core node with a 4-core quota they would start 64).

Idle OpenMP threads busy-wait by default (GNU libgomp spins ``GOMP_SPINCOUNT`` = 300,000 times after each parallel
region, the Intel and LLVM runtimes for ``KMP_BLOCKTIME`` = 200 ms). Training runs thousands of short parallel
regions, so every thread spins most of the time: two processes on the same cores then spend their share spinning
while the other's threads wait, and two trainings side by side took ten times as long as one instead of twice. A
runtime reads its wait policy once, when it is loaded (``import torch``), so importing this module sets
``OMP_WAIT_POLICY=PASSIVE`` and ``KMP_BLOCKTIME=0`` in ``os.environ`` (idle threads sleep at once), unless the user
has set any of ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME``. stpredict imports torch only inside
the functions that need it, so this holds whenever stpredict is used before the user imports torch. For the same
reason it sets ``NUMBA_NUM_THREADS`` (the threads numba launches, read when numba is imported) to :func:`n_threads`
if numba is not imported yet and the variable is not set.

torch's inter-op pool is left alone: stpredict runs no inter-op work (Lightning and the prediction loop run each op
in the calling thread), its threads start on first use and wait on condition variables rather than spinning, and
``torch.set_num_interop_threads`` can be called only once per process, so setting it would break a user's own call.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from stpredict._errors import InputError

__all__ = ["Settings", "limit_threads", "n_threads", "settings", "usable_cores"]

logger = logging.getLogger(__name__)

#: Where the cgroup hierarchies are mounted, and this process's cgroup paths in them (tests point these elsewhere).
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

#: Variables by which a user chooses the OpenMP wait policy; if any is set, stpredict sets none.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


@dataclass
class Settings:
    """Library-wide defaults, read by every function that takes the matching argument as ``None``/``"auto"``.

    Attributes
    ----------
    device
        ``"auto"`` picks CUDA, then MPS, then CPU; or a torch device string such as ``"cuda:1"``.
    show_progress_bar
        Show progress bars on long work (tile loops, training, chunked aggregation).
    verbosity
        Level of the ``stpredict`` logger; handlers are left to the user.
    n_jobs
        Threads of every pool stpredict runs: torch's intra-op threads, numba's kernels and dask's threaded
        scheduler (``num_workers``), applied at the start of each model fit and of
        :func:`stpredict.tl.predict_dense`. ``None``: ``OMP_NUM_THREADS`` when it is set, else the cores this
        process may use (its CPU affinity mask and its cgroup CPU quota), so that processes sharing a machine or a
        quota do not start more threads than they have cores. Set this rather than ``torch.set_num_threads``,
        which the next fit or prediction would reset. numba runs at most the threads it launched with
        (``NUMBA_NUM_THREADS``, by default the same usable cores).
    um_coordinate_system
        Name of the coordinate system in micrometres that :func:`stpredict.pp.calibrate` writes.
    """

    device: str = "auto"
    show_progress_bar: bool = True
    verbosity: Literal["debug", "info", "warning", "error"] = "warning"
    n_jobs: int | None = None
    um_coordinate_system: str = field(default="um")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_initialised", True)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "n_jobs" and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            msg = f"settings.n_jobs must be a positive int or None (the cores this process may use), got {value!r}."
            raise InputError(msg)
        if name == "n_jobs" and value is not None and value < 1:
            msg = f"settings.n_jobs must be at least 1, or None for the cores this process may use; got {value}."
            raise InputError(msg)
        super().__setattr__(name, value)
        # Only an explicit change sets the level: creating the settings must not override the user's logging.
        if name == "verbosity" and getattr(self, "_initialised", False):
            logging.getLogger("stpredict").setLevel(str(value).upper())


settings = Settings()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity mask, capped by its cgroup CPU quota (rounded up).

    The affinity count is ``os.process_cpu_count()`` (Python 3.13+), else ``len(os.sched_getaffinity(0))``, else
    ``os.cpu_count()``. The quota is the tightest over the process's cgroup and its ancestors: cgroup v2
    ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``), else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    (``-1``: none); 1.5 CPUs of quota allow 2 threads.

    Returns
    -------
    At least 1.
    """
    count = _affinity_cores()
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def n_threads() -> int:
    """Threads for each pool: ``settings.n_jobs``, else ``OMP_NUM_THREADS`` when set, else :func:`usable_cores`."""
    if settings.n_jobs is not None:
        return settings.n_jobs
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    return usable_cores()


def limit_threads() -> int:
    """Size torch's intra-op threads, numba's threads (in this thread) and dask's scheduler to :func:`n_threads`.

    Called at the start of every fit and of :func:`stpredict.tl.predict_dense`. torch is sized only when it is
    already imported (a model has imported it); numba is capped at the threads it launched
    (``numba.config.NUMBA_NUM_THREADS``), and its count is per thread (threads started elsewhere keep numba's
    launch count); dask's ``num_workers`` is set in the global ``dask.config``.

    Returns
    -------
    The number of threads chosen.
    """
    import dask
    import numba

    n = n_threads()
    torch = sys.modules.get("torch")
    if hasattr(torch, "set_num_threads") and torch.get_num_threads() != n:  # imported (and not a stand-in)
        torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    dask.config.set(num_workers=n)
    global _late_notice_due
    if _late_notice_due:
        _late_notice_due = False
        logger.info(
            "torch was imported before stpredict's settings, so its OpenMP threads busy-wait when idle and slow "
            "down other processes on the same cores; load them first (`import stpredict as st; st.settings`, then "
            "`import torch`), or set OMP_WAIT_POLICY=PASSIVE before starting Python."
        )
    return n


def _affinity_cores() -> int:
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        count = process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS and Windows before Python 3.13
        count = os.cpu_count()
    return max(1, count or 1)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the tightest CPU quota on this process's cgroups and their ancestors; ``None`` without one."""
    quotas = [q for directory in _cgroup_dirs() if (q := _read_quota(directory)) is not None]
    return min(quotas, default=None)


def _cgroup_dirs() -> list[Path]:
    """Folders that may hold this process's CPU quota: its cgroup in each CPU hierarchy, then each ancestor."""
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    dirs: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one unified hierarchy at the root
            mounts = [CGROUP_ROOT]
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's hierarchy, named in several ways
            mounts = [CGROUP_ROOT / name for name in dict.fromkeys([controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"])]
        else:
            continue
        # Inside a container the path may name the host's cgroup, absent here: its existing ancestors still count.
        relative = PurePosixPath(path).relative_to("/") if path.startswith("/") else PurePosixPath(path)
        for mount in mounts:
            chain = [mount.joinpath(*relative.parts[:i]) for i in range(len(relative.parts), -1, -1)]
            dirs += [d for d in chain if d.is_dir() and d not in dirs]
    return dirs


def _read_quota(directory: Path) -> float | None:
    """The CPUs a cgroup's quota allows (``quota / period``), or ``None`` when it sets none or cannot be read."""
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        fields = []
    if len(fields) >= 2:  # cgroup v2
        quota, period = fields[0], fields[1]
    else:  # cgroup v1
        try:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return q / p if q > 0 and p > 0 else None


def _prefer_passive_waiting() -> bool:
    """Ask OpenMP runtimes loaded from now on to put idle threads to sleep at once; whether it came too late."""
    if any(name in os.environ for name in WAIT_VARIABLES):
        return False  # the user chose a wait policy
    os.environ.update(PASSIVE_WAIT)
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return "torch" in sys.modules or bool(getattr(parallel, "_is_initialized", False))


def _size_numba_launch() -> None:
    """Launch numba with :func:`n_threads` threads (it reads ``NUMBA_NUM_THREADS`` when it is imported)."""
    if "NUMBA_NUM_THREADS" not in os.environ and "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(n_threads())


_late_notice_due = _prefer_passive_waiting()
_size_numba_launch()

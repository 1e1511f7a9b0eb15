"""Thread pools sized from the cores the process may use, idle OpenMP threads that sleep, and settings.n_jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from stpredict import _settings
from stpredict._settings import limit_threads, n_threads, settings, usable_cores
from stpredict.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path


def _fake_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cgroup: str, affinity: int = 8) -> Path:
    """A process with ``affinity`` CPUs whose ``/proc/self/cgroup`` reads ``cgroup``; returns the cgroup root."""
    root = tmp_path / "sys_fs_cgroup"
    root.mkdir()
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(cgroup)
    monkeypatch.setattr(_settings, "CGROUP_ROOT", root)
    monkeypatch.setattr(_settings, "PROC_SELF_CGROUP", proc)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_usable_cores_affinity_without_quota(monkeypatch, tmp_path):
    root = _fake_machine(monkeypatch, tmp_path, "0::/\n", affinity=3)
    _write(root / "cpu.max", "max 100000\n")
    assert usable_cores() == 3


def test_usable_cores_cgroup_v2_quota_rounds_up(monkeypatch, tmp_path):
    root = _fake_machine(monkeypatch, tmp_path, "0::/\n")
    _write(root / "cpu.max", "150000 100000\n")  # 1.5 CPUs
    assert usable_cores() == 2


def test_usable_cores_cgroup_v2_tightest_ancestor(monkeypatch, tmp_path):
    root = _fake_machine(monkeypatch, tmp_path, "0::/user.slice/job.scope\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "cpu.max", "300000 100000\n")
    _write(root / "user.slice" / "job.scope" / "cpu.max", "500000 100000\n")
    assert usable_cores() == 3


def test_usable_cores_cgroup_v2_host_path_absent_in_container(monkeypatch, tmp_path):
    root = _fake_machine(monkeypatch, tmp_path, "0::/docker/0123abcd\n")
    _write(root / "cpu.max", "100000 100000\n")
    assert usable_cores() == 1


def test_usable_cores_cgroup_v1_quota(monkeypatch, tmp_path):
    cgroup = "5:memory:/\n4:cpu,cpuacct:/slurm/job1\n0::/\n"
    root = _fake_machine(monkeypatch, tmp_path, cgroup)
    _write(root / "cpu,cpuacct" / "slurm" / "job1" / "cpu.cfs_quota_us", "400000\n")
    _write(root / "cpu,cpuacct" / "slurm" / "job1" / "cpu.cfs_period_us", "100000\n")
    _write(root / "memory" / "cpu.max", "100000 100000\n")  # another controller's hierarchy: not a CPU quota
    assert usable_cores() == 4


def test_usable_cores_cgroup_v1_no_quota(monkeypatch, tmp_path):
    root = _fake_machine(monkeypatch, tmp_path, "3:cpu:/\n", affinity=6)
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert usable_cores() == 6


def test_usable_cores_without_cgroup_files(monkeypatch, tmp_path):
    _fake_machine(monkeypatch, tmp_path, "", affinity=5)
    monkeypatch.setattr(_settings, "PROC_SELF_CGROUP", tmp_path / "absent")
    assert usable_cores() == 5


def test_usable_cores_prefers_process_cpu_count(monkeypatch, tmp_path):
    root = _fake_machine(monkeypatch, tmp_path, "0::/\n", affinity=8)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 5, raising=False)
    _write(root / "cpu.max", "max 100000\n")
    assert usable_cores() == 5
    _write(root / "cpu.max", "200000 100000\n")
    assert usable_cores() == 2


@pytest.fixture
def pools(monkeypatch):
    """Restore the thread pools and settings.n_jobs after the test."""
    import dask
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads(), dask.config.get("num_workers", None), settings.n_jobs
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])
    dask.config.set(num_workers=before[2])
    settings.n_jobs = before[3]


def test_n_threads_order(monkeypatch, pools):
    monkeypatch.setattr(_settings, "usable_cores", lambda: 7)
    assert n_threads() == 7
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert n_threads() == 3
    settings.n_jobs = 2
    assert n_threads() == 2


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_n_jobs_refuses_non_positive_ints(value, pools):
    with pytest.raises(InputError, match="n_jobs"):
        settings.n_jobs = value
    assert settings.n_jobs is None


def test_limit_threads_default_is_usable_cores(monkeypatch, pools):
    import dask
    import numba
    import torch

    monkeypatch.setattr(_settings, "usable_cores", lambda: 1)
    torch.set_num_threads(2)
    assert limit_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads(), dask.config.get("num_workers")) == (1, 1, 1)


def test_limit_threads_follows_n_jobs(monkeypatch, pools):
    import dask
    import numba
    import torch

    monkeypatch.setattr(_settings, "usable_cores", lambda: 1)
    settings.n_jobs = 2
    assert limit_threads() == 2
    expected = (2, min(2, numba.config.NUMBA_NUM_THREADS), 2)
    assert (torch.get_num_threads(), numba.get_num_threads(), dask.config.get("num_workers")) == expected


def _starts_with_one_thread(call) -> int:
    """Threads torch uses after ``call`` fails on its arguments, with n_jobs = 1 and torch at 2 before."""
    import torch

    settings.n_jobs = 1
    torch.set_num_threads(2)
    with pytest.raises((InputError, AttributeError, TypeError)):
        call()
    return torch.get_num_threads()


def test_fit_sizes_the_pools_first(pools):
    from stpredict.models._training import fit

    model = SimpleNamespace(var_names=["g"], value_kind="neither")  # refused by the loss check
    assert _starts_with_one_thread(lambda: fit(model, [])) == 1


def test_embedding_ridge_fit_sizes_the_pools_first(pools):
    from stpredict.models import EmbeddingRidge

    model = SimpleNamespace(var_names=["g"])
    assert _starts_with_one_thread(lambda: EmbeddingRidge.fit(model, [], table_key=[])) == 1


def test_predict_dense_sizes_the_pools_first(pools):
    import stpredict as st

    assert _starts_with_one_thread(lambda: st.tl.predict_dense(None, None)) == 1


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (*_settings.WAIT_VARIABLES, "NUMBA_NUM_THREADS")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True, timeout=120
    )


def test_openmp_threads_sleep_when_idle_and_numba_launches_n_threads():
    """Imported before torch, stpredict makes the OpenMP runtime put idle threads to sleep (no spinning)."""
    code = (
        "import os, stpredict as st; st.settings; import numba, torch; torch.ones(4).sum(); "
        "print(numba.config.NUMBA_NUM_THREADS, os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'])"
    )
    done = _python(code, OMP_DISPLAY_ENV="VERBOSE", OMP_NUM_THREADS="1")
    assert done.stdout.split() == ["1", "PASSIVE", "0"]
    if "GOMP_SPINCOUNT" in done.stderr:  # GNU libgomp (Linux wheels) shows what it read
        assert "GOMP_SPINCOUNT = '0'" in done.stderr


def test_users_wait_policy_is_kept():
    code = "import os, stpredict as st; st.settings; import torch; print(os.environ.get('KMP_BLOCKTIME', '-'))"
    done = _python(code, OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE")
    assert done.stdout.split() == ["-"]
    if "GOMP_SPINCOUNT" in done.stderr:
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in done.stderr


def test_torch_imported_first_is_reported_once(monkeypatch, caplog, pools):
    monkeypatch.setattr(_settings, "_late_notice_due", True)
    with caplog.at_level("INFO", logger="stpredict"):
        limit_threads()
        limit_threads()
    assert caplog.text.count("OMP_WAIT_POLICY=PASSIVE") == 1

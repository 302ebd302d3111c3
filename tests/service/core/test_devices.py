"""How many CPUs the service may use, and what follows from it: a container's cgroup CPU quota (v2 or v1) lowers
the affinity mask's count, and the default server processes, model workers and torch threads come from that."""

import math
import os

import pytest
import torch

from service.config import Settings
from service.core import devices

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(root, limit: str):
    (root / "cpu.max").write_text(f"{limit} 100000\n")
    return root


def cgroup_v1(root, quota: int, period: int = 100000):
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize("limit, expected", [
    ("max", AFFINITY),  # no quota: every CPU of the mask
    ("50000", 1),  # half a CPU still gets one
    ("150000", min(AFFINITY, 2)),  # 1.5 CPUs round up, never above the mask
    ("6400000", AFFINITY),  # a quota above the mask: the mask
])
def test_a_cgroup_v2_quota_lowers_the_cpus(tmp_path, limit, expected):
    assert devices.available_cpus(cgroup_v2(tmp_path, limit)) == expected


@pytest.mark.parametrize("quota, expected", [(-1, AFFINITY), (100000, 1), (250000, min(AFFINITY, 3))])
def test_a_cgroup_v1_quota_lowers_the_cpus(tmp_path, quota, expected):
    assert devices.available_cpus(cgroup_v1(tmp_path, quota)) == expected


def test_without_cgroup_files_the_mask_counts(tmp_path):
    assert devices.available_cpus(tmp_path) == AFFINITY


def test_the_quota_sets_the_default_processes_workers_and_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "CGROUP", cgroup_v2(tmp_path, "100000"))  # a container of one CPU
    cpu = torch.device("cpu")
    assert Settings(device="cpu").server_processes() == 1
    assert devices.default_workers(cpu) == 1 and devices.default_torch_threads(cpu, workers=1) == 1
    assert Settings(device="cpu", processes=3).server_processes() == 3  # a setting wins over the default


def test_defaults_share_the_cpus_out(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "CGROUP", cgroup_v2(tmp_path, "max"))
    cpu, cpus = torch.device("cpu"), AFFINITY
    assert devices.default_processes("cpu", cpus) == min(8, cpus) and devices.default_processes("cuda", cpus) == 1
    processes = devices.default_processes("cpu", cpus)
    workers = devices.default_workers(cpu, processes)
    assert workers == max(1, min(8, cpus // processes))
    assert devices.default_torch_threads(cpu, workers, processes) == max(1, math.floor(cpus / (workers * processes)))

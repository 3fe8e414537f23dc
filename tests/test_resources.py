"""The CPUs a Ray worker holds, and torch's threads in it: as many as its CPUs, rounded up; a GPU
it holds must be one torch can see."""

import subprocess
import sys

import pytest
import torch

from diffusion.platform import resources
from helpers import ROOT, cli_env


@pytest.mark.parametrize(
    "free, nodes, count, share",
    [
        (2, [2], 1, 1.0),  # a 2-core machine: one CPU trains, one reads
        (2, [2], 2, 0.5),
        (8, [8], 1, 7.0),  # a laptop: seven of its eight cores train
        (8, [8], 3, 2.0),  # in steps of half a CPU
        (4, [2, 2], 1, 1.0),  # no more than a node's CPUs but one
        (1.99, [2], 1, 0.5),  # beside a Tune trial's 0.01 CPU
        (1, [1], 4, 0.5),  # at least half a CPU
    ],
)
def test_training_workers_share_the_free_cpus_but_one(monkeypatch, free, nodes, count, share):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": n}} for n in nodes])
    assert resources.cpu_share(count) == share


def test_a_worker_runs_torch_on_as_many_threads_as_its_cpus(ray_local):
    """Ray sets OMP_NUM_THREADS to the CPUs rounded down (one thread for 1.5 CPUs); a worker of
    this project runs as many threads as it holds CPUs, rounded up."""

    @ray_local.remote
    def threads(reading_share: float = 0.0) -> tuple[int, int]:
        return resources.use_assigned_resources(reading_share), torch.get_num_threads()

    assert ray_local.get(threads.options(num_cpus=1.5).remote()) == (2, 2)
    assert ray_local.get(threads.options(num_cpus=0.5).remote()) == (1, 1)
    # A CPU training worker adds its part of the CPU kept for Ray Data: on 2 cores one worker
    # (1 CPU) trains on 2 threads, each of two (0.5 CPU) on one.
    assert ray_local.get(threads.options(num_cpus=1).remote(1.0)) == (2, 2)
    assert ray_local.get(threads.options(num_cpus=0.5).remote(0.5)) == (1, 1)


GPU_WITHOUT_CUDA = """
import ray
from diffusion.platform.resources import use_assigned_resources
ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
try:
    ray.get(ray.remote(num_gpus=1)(use_assigned_resources).remote())
except ray.exceptions.RayTaskError as e:
    print(e)
"""


@pytest.mark.slow
def test_a_worker_on_a_gpu_torch_cannot_see_stops_naming_its_node():
    """A Ray that declares a GPU this machine does not have: the worker placed on it fails at
    once, where it would otherwise train on the CPU without a word."""
    proc = subprocess.run(
        [sys.executable, "-c", GPU_WITHOUT_CUDA], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert "GpuNotVisibleError" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Ray placed this worker on GPU 0 of node " in proc.stdout and "sees no CUDA device there" in proc.stdout
    assert "--gpus-per-worker 0" in proc.stdout

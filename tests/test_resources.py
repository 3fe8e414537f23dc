"""The CPUs a Ray worker holds, and torch's threads in it: as many as its CPUs, rounded up."""

import pytest
import torch

from diffusion.platform import resources


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
    def threads() -> tuple[int, int]:
        return resources.use_assigned_cpus(), torch.get_num_threads()

    assert ray_local.get(threads.options(num_cpus=1.5).remote()) == (2, 2)
    assert ray_local.get(threads.options(num_cpus=0.5).remote()) == (1, 1)

"""The Ray cluster this process works on: connecting to it, and the workers a job gets from
its GPUs. One rule everywhere: without a count, one worker per GPU (one worker on a cluster
without GPUs); a worker holds one GPU and one CPU where the cluster has GPUs. On CPU-only
clusters, training workers share the free CPUs but one, which Ray Data's read tasks need (each
asks for a whole CPU: without it they never start), and the actors of a pipeline (sampling,
features) hold half a CPU each, so that its stages fit beside each other. A worker or actor
runs torch on as many threads as the CPUs it holds, rounded up, and fails at once where it
holds a GPU that torch cannot see (`use_assigned_resources`)."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace

import ray
import ray._private.utils as ray_utils  # for set_sigterm_handler: see connect
import torch

from ..errors import InputError
from ..speed import fast_cuda_kernels
from . import logs


class RayStartError(InputError):
    """Ray could not be started or reached."""


def connect(verbose: bool = True) -> None:
    """Connect to the Ray cluster of RAY_ADDRESS (or start a local one) unless connected; unless
    `verbose`, this process's log shows the project's lines and not Ray's (`logs`). Off a
    terminal (a log file, CI) Ray Data's progress bars are off, here and in the processes of a
    Ray this process starts: a Tune trial's training would print them as lines of escape codes.
    (A trial does not pass on its DataContext to the actors that run its data set.)"""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # read as Ray Data is imported
        ray.data.DataContext.get_current().enable_progress_bars = False  # here, where it was imported
    if not ray.is_initialized():
        start_ray(verbose)


def start_ray(verbose: bool) -> None:
    """ray.init(), as `connect` says. Ray's start-up waits inside its C++ core, where Python's
    signal handlers never run, so while it does, Ctrl-C and SIGTERM keep their default action and
    end the process at once (the processes Ray starts share its fate). ray.init() installs a
    Python SIGTERM handler of its own first, which would leave SIGTERM unanswered for as long as
    a start-up hangs: it is kept from doing so for the duration. A start-up that fails is a
    RayStartError naming the address."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    set_sigterm_handler = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    if not verbose:
        logs.quiet_driver()
    try:
        ray.init(logging_level=logging.INFO if verbose else logging.WARNING)
        logs.hide_worker_pool_advice(not verbose)
        if not verbose:
            logs.hide_workers_stderr()
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        address = os.environ.get("RAY_ADDRESS")
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayStartError(
            f"could not start or reach {where} ({first}); check that the head is up and RAY_ADDRESS names it, "
            "or unset RAY_ADDRESS for a local Ray"
        ) from None
    finally:
        ray_utils.set_sigterm_handler = set_sigterm_handler
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cpu_share(count: int) -> float:
    """CPUs for each of `count` CPU workers: the cluster's free CPUs less one CPU for Ray Data,
    and no more than the largest node less one, in steps of half a CPU; at least half a CPU.
    2 CPUs: one worker 1, two workers 0.5 each; an 8-core machine: one worker 7."""
    free = ray.available_resources().get("CPU", 0.0)
    largest = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)
    share = min(largest - 1, (free - 1) / count)
    return max(0.5, math.floor(2 * share) / 2)


class GpuNotVisibleError(RuntimeError):
    """Ray placed a worker on a GPU that torch on its node cannot see."""


def use_assigned_resources(reading_share: float = 0.0) -> int:
    """In a Ray worker or actor: torch's CPU threads set to the CPUs Ray gave it plus
    `reading_share` (a training worker's part of the CPU `cpu_share` keeps for Ray Data, whose
    reading needs a fraction of it), rounded up (Ray's own OMP_NUM_THREADS rounds down, to one
    thread for 1.5 CPUs): one CPU training worker on 2 cores trains on 2 threads, two on one
    each. A GPU Ray gave it is checked:
    torch must see it (else a GpuNotVisibleError naming the node, rather than a run on the CPU
    without a word), with cuDNN autotuning and TF32 turned on. Returns the thread count."""
    context = ray.get_runtime_context()
    threads = max(1, math.ceil(context.get_assigned_resources().get("CPU", 1) + reading_share - 1e-9))
    torch.set_num_threads(threads)
    gpus = context.get_accelerator_ids().get("GPU", [])
    if gpus and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise GpuNotVisibleError(
            f"Ray placed this worker on GPU {', '.join(gpus)} of node {ray.util.get_node_ip_address()} "
            f"({socket.gethostname()}), but torch {torch.__version__} ({build}) sees no CUDA device there: "
            "check the node's driver (nvidia-smi) and install a CUDA build of torch on it, or run without GPUs "
            "(--gpus-per-worker 0)"
        )
    if gpus:
        fast_cuda_kernels()
    return threads


@dataclass(frozen=True)
class Workers:
    """Ray workers or actors: how many, and the GPUs and CPUs of each (0 and -1: from the cluster)."""

    count: int = 0  # 0: one per GPU of the cluster, or 1 without GPUs
    gpus: float = -1.0  # per worker; -1: 1 if the cluster has GPUs, else 0
    cpus: float = 0.0  # per worker; 0: 1 with a GPU, else half a CPU or (share) `cpu_share`

    def resolve(self, share: bool = False) -> Workers:
        """The concrete numbers on the connected cluster; with `share`, CPU workers split the
        free CPUs (a training run) instead of holding half a CPU each (a pipeline's actors)."""
        gpus = cluster_gpus()
        per_worker = self.gpus if self.gpus >= 0 else (1.0 if gpus else 0.0)
        count = self.count or max(1, gpus)
        cpus = 1.0 if per_worker else (cpu_share(count) if share else 0.5)
        return replace(self, count=count, gpus=per_worker, cpus=self.cpus or cpus)


def map_with_actors(ds, actor_class, args: tuple, batch_size: int, workers: Workers):
    """`ds.map_batches` through a pool of `workers.count` actors of `actor_class(*args)`, each
    holding `workers.gpus` GPUs and `workers.cpus` CPUs (numpy batches of `batch_size` rows).
    Ray Data spreads them over the cluster's nodes where their resources allow (its default)."""
    return ds.map_batches(
        actor_class,
        fn_constructor_args=args,
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=workers.gpus,
        num_cpus=workers.cpus,
        compute=ray.data.ActorPoolStrategy(size=workers.count),
    )

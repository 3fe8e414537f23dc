"""The Ray cluster this process works on: connecting to it, and the workers a job gets from
its GPUs. One rule everywhere: without a count, one worker per GPU (one worker on a cluster
without GPUs); a worker holds one GPU where the cluster has GPUs, and one CPU (half a CPU on
CPU-only clusters, where a whole core per worker starves Ray Data's read tasks)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, replace

from ..errors import InputError


class RayStartError(InputError):
    """Ray could not be started or reached."""


def connect() -> None:
    """Connect to the Ray cluster of RAY_ADDRESS (or start a local one) unless connected.

    Ray's start-up waits inside its C++ core, where Python's signal handlers never run, so while
    it does, Ctrl-C and SIGTERM keep their default action and end the process at once (the
    processes Ray starts share its fate). ray.init() installs a Python SIGTERM handler of its
    own first, which would leave SIGTERM unanswered for as long as a start-up hangs: it is kept
    from doing so for the duration. A start-up that fails is a RayStartError naming the address."""
    import ray
    import ray._private.utils as ray_utils  # for set_sigterm_handler: see above

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    set_sigterm_handler = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        ray.init()
        if not sys.stderr.isatty():  # in a log, Ray Data's bars are carriage returns and escape codes
            ray.data.DataContext.get_current().enable_progress_bars = False
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
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@dataclass(frozen=True)
class Workers:
    """Ray workers or actors: how many, and the GPUs and CPUs of each (0 and -1: from the cluster)."""

    count: int = 0  # 0: one per GPU of the cluster, or 1 without GPUs
    gpus: float = -1.0  # per worker; -1: 1 if the cluster has GPUs, else 0
    cpus: float = 0.0  # per worker; 0: 1 with a GPU, 0.5 without

    def resolve(self) -> Workers:
        """The concrete numbers on the connected cluster."""
        gpus = cluster_gpus()
        per_worker = self.gpus if self.gpus >= 0 else (1.0 if gpus else 0.0)
        return replace(
            self,
            count=self.count or max(1, gpus),
            gpus=per_worker,
            cpus=self.cpus or (1.0 if per_worker else 0.5),
        )


def map_with_actors(ds, actor_class, args: tuple, batch_size: int, workers: Workers):
    """`ds.map_batches` through a pool of `workers.count` actors of `actor_class(*args)`, each
    holding `workers.gpus` GPUs and `workers.cpus` CPUs (numpy batches of `batch_size` rows)."""
    import ray

    return ds.map_batches(
        actor_class,
        fn_constructor_args=args,
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=workers.gpus,
        num_cpus=workers.cpus,
        compute=ray.data.ActorPoolStrategy(size=workers.count),
    )

"""The Ray cluster this process works on: connecting to it, and the workers a job gets from
its GPUs. One rule everywhere: without a count, one worker per GPU (one worker on a cluster
without GPUs); a worker holds one GPU where the cluster has GPUs, and one CPU (half a CPU on
CPU-only clusters, where a whole core per worker starves Ray Data's read tasks)."""

from __future__ import annotations

from dataclasses import dataclass, replace


def connect() -> None:
    """Connect to the Ray cluster of RAY_ADDRESS (or start a local one) unless connected."""
    import ray

    if not ray.is_initialized():
        ray.init()


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

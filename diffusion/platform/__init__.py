"""The platform layer around the core: object storage, Ray (Data, Train, Tune, Serve), MLflow,
HTTP and the command lines. Everything that needs ray, mlflow, pyarrow, boto3 or fastapi lives
here; `diffusion` itself (the core) never imports this package at import time.

    storage.py          URIs (a folder or s3://bucket/prefix) -> pyarrow filesystems
    sources.py          readers of the CIFAR-10 / STL-10 archives and of image folders
    shards.py           Parquet shards + manifest.json; ShardSet: verified reading, Ray Data
    resources.py        connecting to Ray, GPUs and workers from the cluster, actor pools
    tracking.py         everything MLflow: runs, params, metrics, images, checkpoint URIs
    checkpoint_uris.py  checkpoints behind s3://, runs:/ and models:/ URIs
    ray_train.py        the core's training loop on Ray Train: the driver (train_on_ray) and each worker
    sweep.py            Ray Tune sweeps, each trial a ray_train.Training
    batch_sample.py     the batch sampling job (Ray Data actors -> storage) and the papers' figures
    evaluate.py         FID / IS on Ray: reference statistics, Inception actors
    serve.py            the Ray Serve HTTP application (schemas.py, http.py: its requests and edge)
    settings.py         every platform option, defined once
    cli.py              the command lines' flags (derived from the options) and errors
"""

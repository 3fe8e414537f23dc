"""Serve a trained model over HTTP with Ray Serve (sampling, interpolation, sequences).

    python jobs/serve.py --checkpoint runs/cifar10-linear                 # latest checkpoint of a run
    python jobs/serve.py --checkpoint s3://bucket/runs/cifar10-linear --replicas 1 --max-replicas 8 --gpus 1 --host 0.0.0.0
    python jobs/serve.py --checkpoint runs:/<mlflow run id>               # a training run tracked in MLflow
    serve run jobs/serve_config.yaml                                      # the same, from a Serve config
    ray job submit --working-dir . -- python jobs/serve.py --checkpoint s3://bucket/runs/NAME --detach   # on a cluster

Then: curl -X POST localhost:8000/v1/samples -H 'content-type: application/json' -d '{"n": 16, "seed": 0}' -o samples.png
The schema is at /docs and /openapi.json.
"""

from __future__ import annotations

from diffusion.platform.cli import add_checkpoint_options, add_speed_options, fail, parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    add_checkpoint_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--batch-size", type=int, default=16, help="images per model batch (the fixed batch shape)")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="how long a batch waits for more requests")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, default=0, help="autoscale up to this many replicas (0: fixed)")
    p.add_argument("--target-ongoing", type=float, default=32, help="autoscaling: requests in flight per replica")
    p.add_argument("--gpus", type=float, default=-1, help="GPUs per replica (-1: 1 if the cluster has GPUs)")
    g = p.add_argument_group("bounds (in UNet calls at the batch shape: ceil(images / batch size) x sampler steps)")
    g.add_argument("--long-request-calls", type=int, default=200, help="above this, a request takes the long lane")
    g.add_argument("--max-request-calls", type=int, default=1000, help="above this, a request gets a 422")
    g.add_argument("--max-queued-calls", type=int, default=4000, help="above this in a lane, a request gets a 503")
    add_speed_options(p)
    p.add_argument("--detach", action="store_true", help="deploy and exit; the app keeps running (`serve shutdown`)")
    args = p.parse_args(argv)

    import signal
    import threading

    from ray import serve

    from diffusion.checkpoint import read_checkpoint
    from diffusion.platform.resources import Workers, connect
    from diffusion.platform.serve import ServeArgs, build_app, deployment_failure

    read_checkpoint(args.checkpoint, args.endpoint_url, args.which)  # a bad checkpoint is named here, before Ray
    connect()
    serve.start(http_options={"host": args.host, "port": args.port})
    app_args = ServeArgs(
        checkpoint=args.checkpoint,
        which=args.which,
        endpoint_url=args.endpoint_url,
        batch_size=args.batch_size,
        batch_wait_s=args.batch_wait_s,
        ema=not args.raw,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing,
        gpus=Workers(gpus=args.gpus).resolve().gpus,
        precision=args.precision,
        compile=args.compile,
        long_request_calls=args.long_request_calls,
        max_request_calls=args.max_request_calls,
        max_queued_calls=args.max_queued_calls,
    )
    try:
        serve.run(build_app(app_args), blocking=False)
    except RuntimeError:  # the application failed to deploy: say why its replicas did
        cause = deployment_failure()
        serve.shutdown()
        return fail(f"the Serve application did not start: {cause}")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # from here on, a stop is a clean shutdown
        signal.signal(sig, lambda *_: stopped.set())
    scaling = f"{args.replicas}..{args.max_replicas} autoscaled" if args.max_replicas > args.replicas else args.replicas
    stop_with = "`serve shutdown` to stop" if args.detach else "Ctrl-C to stop"
    print(f"serving {args.checkpoint} at http://{args.host}:{args.port}, replicas {scaling} ({stop_with})", flush=True)
    if args.detach:
        return 0
    while not stopped.wait(1):
        pass
    serve.shutdown()
    return 0


if __name__ == "__main__":
    run(main)

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

import sys

from diffusion.platform.cli import add_speed_options, parser


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint, run folder, s3:// URI or runs:/<mlflow run id>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--batch-size", type=int, default=16, help="images per model batch (the fixed batch shape)")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="how long a batch waits for more requests")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, default=0, help="autoscale up to this many replicas (0: fixed)")
    p.add_argument("--target-ongoing", type=float, default=32, help="autoscaling: requests in flight per replica")
    p.add_argument("--gpus", type=float, default=-1, help="GPUs per replica (-1: 1 if the cluster has GPUs)")
    p.add_argument("--raw", action="store_true", help="serve the raw weights instead of the EMA")
    add_speed_options(p)
    p.add_argument("--detach", action="store_true", help="deploy and exit; the app keeps running (`serve shutdown`)")
    args = p.parse_args(argv)

    import signal

    from ray import serve

    from diffusion.platform.resources import Workers, connect
    from diffusion.platform.serve import ServeArgs, build_app

    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait below, in every thread
    connect()
    serve.start(http_options={"host": args.host, "port": args.port})
    app_args = ServeArgs(
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        batch_wait_s=args.batch_wait_s,
        ema=not args.raw,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing,
        gpus=Workers(gpus=args.gpus).resolve().gpus,
        precision=args.precision,
        compile=args.compile,
    )
    serve.run(build_app(app_args), blocking=False)
    scaling = f"{args.replicas}..{args.max_replicas} autoscaled" if args.max_replicas > args.replicas else args.replicas
    stop_with = "`serve shutdown` to stop" if args.detach else "Ctrl-C to stop"
    print(f"serving {args.checkpoint} at http://{args.host}:{args.port}, replicas {scaling} ({stop_with})", flush=True)
    if args.detach:
        return 0
    signal.sigwait(stop)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serve a trained model over HTTP with Ray Serve (sampling, interpolation, sequences).

    python jobs/serve.py --checkpoint runs/cifar10-linear                 # latest checkpoint of a run
    RAY_DIFFUSION_API_KEY=... python jobs/serve.py --checkpoint s3://bucket/runs/cifar10-linear --replicas 1 --max-replicas 8 --gpus 1 --host 0.0.0.0
    python jobs/serve.py --checkpoint runs:/<mlflow run id>               # a training run tracked in MLflow
    serve run jobs/serve_config.yaml                                      # the same, from a Serve config
    ray job submit --working-dir . -- python jobs/serve.py --checkpoint s3://bucket/runs/NAME --detach   # on a cluster

Then: curl -X POST localhost:8000/v1/samples -H 'content-type: application/json' -d '{"n": 16, "seed": 0}' -o samples.png
The schema is at /docs and /openapi.json. With RAY_DIFFUSION_API_KEY set (required to bind
anything but loopback), requests must send `-H "Authorization: Bearer $RAY_DIFFUSION_API_KEY"`;
the replicas get only the key's SHA-256.
"""

from __future__ import annotations

import os
from dataclasses import fields

from diffusion.platform.cli import add_checkpoint_options, add_options, fail, given, parser, run
from diffusion.platform.settings import API_KEY_ENV, CheckpointOptions, ServeArgs, key_sha256

LOOPBACK = ("127.0.0.1", "localhost", "::1")
APP = "diffusion"  # the application's name in Serve, as in jobs/serve_config.yaml


def main(argv=None) -> int:
    p = parser(__doc__)
    add_checkpoint_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    add_options(
        p.add_argument_group(
            "serving", "Bounds are in UNet calls at the batch shape: ceil(images / batch size) x sampler steps."
        ),
        ServeArgs,
        skip=(*(f.name for f in fields(CheckpointOptions)), "api_key_sha256"),
    )
    p.add_argument("--detach", action="store_true", help="deploy and exit; the app keeps running (`serve shutdown`)")
    p.add_argument("--verbose", action="store_true", help="also Ray's and Serve's own log lines")
    args = p.parse_args(argv)
    key = os.environ.get(API_KEY_ENV, "")
    if not key and args.host not in LOOPBACK:
        return fail(
            f"--host {args.host} serves other machines: set {API_KEY_ENV} to a secret key that requests must send "
            "(Authorization: Bearer KEY), or bind 127.0.0.1"
        )
    app_args = ServeArgs(**given(args, ServeArgs), api_key_sha256=key_sha256(key))  # out of range: named here

    import signal
    import threading

    from ray import serve

    from diffusion.platform.resources import connect
    from diffusion.platform.serve import build_app, deployment_failure

    app_args.read()  # a bad checkpoint is named here, before Ray
    connect(verbose=args.verbose)
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(build_app(app_args), name=APP, blocking=False)
    except RuntimeError:  # the application failed to deploy: say why its replicas did
        cause = deployment_failure(APP)
        serve.delete(APP)
        return fail(f"the Serve application did not start: {cause}")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # from here on, a stop is a clean shutdown
        signal.signal(sig, lambda *_: stopped.set())
    scaling = f"{args.replicas}..{args.max_replicas} autoscaled" if args.max_replicas > args.replicas else args.replicas
    stop_with = "`serve shutdown` to stop" if args.detach else "Ctrl-C to stop"
    auth = f", API key required ({API_KEY_ENV})" if key else ""
    print(
        f"serving {args.checkpoint} at http://{args.host}:{args.port}, replicas {scaling}{auth} ({stop_with})",
        flush=True,
    )
    print(f"try: {example_request(args.host, args.port, bool(key))}", flush=True)
    if args.detach:
        return 0
    while not stopped.wait(1):
        pass
    # Its app alone, its requests drained: on a cluster, Serve goes on for other apps (`serve shutdown`
    # ends it); a local Ray ends with this process. (serve.shutdown kills Serve's controller while
    # it runs its last task, which Ray reports as an error.)
    serve.delete(APP)
    print(f"stopped serving {args.checkpoint}", flush=True)
    return 0


def example_request(host: str, port: int, with_key: bool) -> str:
    """A curl command for 16 images from seed 0 into samples.png, as this service takes it."""
    address = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    header = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if with_key else ""
    body = '{"n": 16, "seed": 0}'
    return f"curl -X POST http://{address}:{port}/v1/samples -H 'content-type: application/json'{header} -d '{body}' -o samples.png"


if __name__ == "__main__":
    run(main)

"""A training run's curve, judged: every checkpoint of a run folder sampled and judged by the data
set's own classifier (the kept judge for CIFAR-10, the digits' for the digits), beside the
held-out L_simple of its raw and EMA weights that training recorded, against the images seen.
A class-conditional run is judged at each --guidance scale: the class agreement (the share of
samples classified as the class asked for, seed i of class i mod K), the confident share and the
FD; an unconditional one by its FD and confident share. Each point goes to curve.json (a
checkpoint already there is not judged again, so the script follows a run that is still
training) and, with --mlflow, into the training's own MLflow run at the checkpoint's step.

    python bench/curve.py --run runs/cifar10-classes --data data/cifar10 --guidance 0 3 --out bench/results/curve
    python bench/curve.py --run runs/digits-classes --data data/digits --n 200 --guidance 1 2 --mlflow
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from core import machine  # bench/core.py, beside this script
from quality import as_images, generate, guidance_settings, labels

from diffusion.checkpoint import CHECKPOINT_FILE, METRICS_FILE, read_checkpoint, recipe_of
from diffusion.classifier import Scorer
from diffusion.config import SamplerSettings
from diffusion.pipeline import Pipeline
from diffusion.platform.cli import add_options, given


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder of checkpoint-<step> folders")
    p.add_argument("--data", required=True, help="the prepared data set it trains on (the judge's reference)")
    p.add_argument("--n", type=int, default=300, help="samples per point and guidance scale")
    # The curve's sampler (SamplerSettings' flags but its guidance, which --guidance lists): DPM-Solver++(2M) 10.
    guidance = {"guidance_scale", "guidance_min_t", "guidance_max_t"}
    add_options(
        p, SamplerSettings, skip=guidance, defaults={"sampler": "dpmpp_2m", "steps": 10, "spacing": "quadratic"}
    )
    p.add_argument("--guidance", nargs="+", default=["1"], help="guidance scales (SCALE or SCALE@MIN-MAX)")
    p.add_argument("--every", type=int, default=1, help="judge the checkpoints whose step is a multiple of this")
    p.add_argument("--batch-size", type=int, default=100, help="samples per model call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--mlflow", action="store_true", help="log each point into the training's MLflow run")
    p.add_argument("--out", default="bench/results/curve", help="folder for curve.json")
    args = p.parse_args(argv)
    for spec in args.guidance:
        try:
            guidance_settings(spec)
        except argparse.ArgumentTypeError as e:
            p.error(f"--guidance: {e}")
    return args


def point(payload: dict, scorer: Scorer, args, metrics: dict) -> dict:
    """One checkpoint judged at every guidance scale, with what training measured at its step."""
    recipe = recipe_of(payload)
    pipeline = Pipeline.from_checkpoint(payload, batch_size=args.batch_size, device="cpu")
    result = {
        "step": payload["step"],
        "images_seen": payload["step"] * recipe.batch_size,
        **{k: metrics.get(k) for k in ("heldout_loss", "heldout_loss_ema")},
    }
    for spec in args.guidance if pipeline.num_classes else ["1"]:
        settings = SamplerSettings(**given(args, SamplerSettings), **guidance_settings(spec))
        start = time.time()
        images = as_images(generate(pipeline, settings, args.n, args.batch_size))
        judged = scorer(images, labels(pipeline, 0, args.n))
        judged = {k: v for k, v in judged.items() if k in ("fd", "confident", "class_agreement")}
        result[spec] = {**judged, "seconds": time.time() - start}
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusion.platform import tracking
    from diffusion.platform.evaluate import own_judge
    from diffusion.platform.shards import ShardSet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    report = json.loads(path.read_text()) if path.is_file() else {"points": []}
    done = {p["step"] for p in report["points"]}
    shards = ShardSet.open(args.data)
    judge = own_judge(shards)
    train = next(shards.iter_batches(len(shards), splits=["train"]))["image"]
    test = next(shards.iter_batches(len(shards), splits=["test"]))["image"]
    scorer = Scorer(judge.build(), train, test[: args.n])  # the floor at the curve's n
    report.update(
        run=args.run,
        metric=judge.metric,
        n=args.n,
        sampler=SamplerSettings(**given(args, SamplerSettings)).label(1000),
        guidance=args.guidance,
        floor=scorer.floor,
        machine=machine(),
    )
    folders = sorted(p for p in Path(args.run).glob("checkpoint-*") if (p / CHECKPOINT_FILE).is_file())
    for folder in folders:
        step = int(folder.name.split("-")[1])
        if step in done or step % args.every:
            continue
        metrics_file = folder / METRICS_FILE
        metrics = json.loads(metrics_file.read_text())["metrics"] if metrics_file.is_file() else {}
        payload = read_checkpoint(folder)
        result = point(payload, scorer, args, metrics)
        report["points"] = sorted([*report["points"], result], key=lambda p: p["step"])
        path.write_text(json.dumps(report, indent=2))
        print(json.dumps(result), flush=True)
        if args.mlflow and payload.get("mlflow_run_id"):
            values = {  # MLflow's keys take no "@": s3@0-600 is s3_t0-600
                f"judge/{name}_s{spec.replace('@', '_t')}": value
                for spec in args.guidance
                for name, value in result.get(spec, {}).items()
                if name != "seconds"
            }
            tracking.Run(payload["mlflow_run_id"], safe=True).log_metrics(values, step)
    print(f"wrote {path}: {len(report['points'])} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

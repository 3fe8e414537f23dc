"""FID and Inception Score of a checkpoint's samples against a prepared data set, on a Ray
cluster (sampling and Inception features on every GPU), logged to MLflow with every setting.
Without Inception weights, CIFAR-10 and the 8x8 digits are judged by a classifier trained on
their own train split (the ResNet-20 kept in the package; a small CNN trained and cached beside
the digits' shards): an FD in its features (FD-CIFAR10, FD-digits: not FID), the classifier
score, the share of confidently classified samples, each class's share of the samples and the
floor (the real test split against the reference). A class-conditional model draws class seed
mod K (or each of --classes from every seed), guided by --guidance; where the judge knows its
classes, the class agreement is measured too: the share of samples classified as the class they
were asked for.

    python jobs/evaluate.py --checkpoint runs/cifar10-linear --data data/cifar10 --n 50000 --sampler ddim --steps 100 --spacing quadratic
    python jobs/evaluate.py --checkpoint runs:/<mlflow run id> --data s3://bucket/cifar10 --splits train --weights raw

    python jobs/evaluate.py --checkpoint runs/digits-linear --data data/digits --n 2000 --steps 50 --spacing uniform

The reference statistics (and the digits' classifier) are computed once per data set, splits
and weights, and cached beside the shards. Inception weights: --inception-weights, $FID_INCEPTION_WEIGHTS, or the
torch hub cache (pt_inception-2015-12-05-6726825d.pth, downloaded there when reachable).
"""

from __future__ import annotations

import json

from diffusion.platform.cli import add_options, add_sampling_options, parser, run, sampling_job
from diffusion.platform.settings import FidWeights


def main(argv=None) -> int:
    p = parser(__doc__)
    add_sampling_options(p, n=50000, batch_size=100, workers=True, output=False, steps=100, spacing="quadratic")
    p.add_argument("--data", required=True, help="prepared data set of the reference statistics (folder or s3://)")
    p.add_argument("--splits", nargs="+", default=["train"], help="reference splits (the papers: train)")
    p.add_argument("--out", default=None, help="also keep the samples here as npz shards (folder or s3://)")
    add_options(p, FidWeights)
    args = p.parse_args(argv)
    job = sampling_job(args, p)
    if job.n < 2:
        p.error("--seeds must name at least 2 seeds (a covariance needs two samples)")

    from diffusion.platform.evaluate import evaluate

    results = evaluate(job, args.data, args.splits, args.inception_weights, out=args.out)
    print(json.dumps(results, indent=2))
    against = f"({results['n']} samples vs {results['reference_n']} {results['reference_splits']} images)"
    if results["metric"] == "fid":
        print(f"FID {results['fid']:.2f}, IS {results['is_mean']:.2f} +- {results['is_std']:.2f} {against}")
    else:  # a classifier's FD: not FID
        fd, name = results["metric"], results["metric"].upper().replace("_", "-").replace("DIGITS", "digits")
        floor = f", floor {results[fd + '_floor']:.2f} (test vs train)" if fd + "_floor" in results else ""
        agreement = f", class agreement {results['class_agreement']:.1%}" if "class_agreement" in results else ""
        print(
            f"{name} {results[fd]:.2f}{floor}, classifier score {results['classifier_score_mean']:.2f}, "
            f"{results['confident_share']:.1%} classified with confidence >= 0.9, class shares "
            f"{results['class_share_min']:.1%} to {results['class_share_max']:.1%}{agreement} {against}"
        )
    return 0


if __name__ == "__main__":
    run(main)

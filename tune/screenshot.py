"""Screenshot the MLflow UI with headless Chromium: a sweep's run-comparison page, or a run's
page in MLflow's training view (its dataset, tags, metrics, and its logged models at their
steps, and registered ones) beside its latest sample grid.

    python tune/screenshot.py --sweep lr-sched --out sweep-compare.png      # MLflow store from MLFLOW_TRACKING_URI
    python tune/screenshot.py --sweep lr-sched --tracking-uri sqlite:///mlflow.db --dom-out page.html
    python tune/screenshot.py --run <run id> --out run.png

It starts `mlflow server` on 127.0.0.1 over the tracking store (unless --server points at a
running one), opens the page, and writes a PNG (and, with --dom-out, the rendered page).
Chromium: `apt-get install chromium`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from contextlib import contextmanager

from diffusion.platform.cli import add_options, parser
from diffusion.platform.net import free_port, wait_for_http
from diffusion.platform.settings import Tracking

# Browser window heights (1600 wide): a run's overview reaches down to its logged models (name, step, metrics).
COMPARE_PAGE_HEIGHT, RUN_PAGE_HEIGHT = 1400, 2200


@contextmanager
def mlflow_server(tracking_uri: str):
    """`mlflow server` on 127.0.0.1 over `tracking_uri`; yields its URL."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        tracking_uri,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_http(f"{url}/health", 120, proc)
        except (TimeoutError, ChildProcessError) as e:
            proc.terminate()
            raise RuntimeError(f"mlflow server did not start ({e}): {proc.stderr.read()[-2000:]}") from None
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def compare_url(server: str, tracking_uri: str, sweep: str, experiment: str) -> tuple[str, list[str]]:
    """The compare-runs URL of the sweep's trial runs, and their run names."""
    from mlflow.tracking import MlflowClient

    from diffusion.platform.tracking import SWEEP_TAG

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'")
    trials = [r for r in runs if r.data.tags.get("kind") != "sweep"]
    if not trials:
        raise SystemExit(f"no trial runs of sweep {sweep!r} in {tracking_uri}: check --sweep and --tracking-uri")
    ids = [r.info.run_id for r in trials]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
    return f"{server}/#/compare-runs?{query}", [r.info.run_name for r in trials]


def run_urls(server: str, tracking_uri: str, run_id: str, image_key: str) -> tuple[list[str], list[str]]:
    """The URLs of a run's overview and of its latest image under `image_key` (MLflow's image
    chart opens on step 0, so the grid is shown from the run's artifacts), in MLflow's training
    view, and its name."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from diffusion.platform.tracking import run_page

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SystemExit(f"no MLflow run {run_id!r} in {tracking_uri}: check --run and --tracking-uri") from None
    experiment = run.info.experiment_id
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    latest = max(
        (p for p in images if p.split("/")[-1].split("+")[0] == image_key),
        key=lambda p: int(p.split("+step+")[1].split("+")[0]),
        default=None,
    )
    tabs = [""] if latest is None else ["", f"artifacts/{latest}"]
    return [f"{server}/{run_page(experiment, run_id, tab)}" for tab in tabs], [run.info.run_name]


def side_by_side(paths: list[str], out: str) -> None:
    from PIL import Image

    shots = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(s.width for s in shots), max(s.height for s in shots)), "white")
    x = 0
    for shot in shots:
        canvas.paste(shot, (x, 0))
        x += shot.width
    canvas.save(out)


def chromium(*args: str, height: int) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("Chromium not found: install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",  # this machine's network is closed: no updates, no sync
            "--disable-component-update",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size=1600,{height}",
            "--virtual-time-budget=20000",
            *args,
        ]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)


def main(argv=None) -> int:
    p = parser(__doc__)
    page = p.add_mutually_exclusive_group(required=True)
    page.add_argument("--sweep", help="a sweep's --name: its trials' compare page")
    page.add_argument("--run", help="a run id: its page")
    p.add_argument("--image", default="samples", help="with --run: the logged image key shown beside the page")
    p.add_argument("--out", default="mlflow.png", help="PNG to write")
    p.add_argument("--dom-out", default=None, help="also write the rendered page's HTML here")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--server", default=None, help="a running MLflow server to use instead of starting one")
    add_options(p, Tracking)
    args = p.parse_args(argv)

    import mlflow

    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()

    def shoot(server: str) -> None:
        if args.sweep:
            url, names = compare_url(server, tracking_uri, args.sweep, args.experiment)
            urls = [url]
        else:
            urls, names = run_urls(server, tracking_uri, args.run, args.image)
        height = COMPARE_PAGE_HEIGHT if args.sweep else RUN_PAGE_HEIGHT
        with tempfile.TemporaryDirectory() as tmp:
            shots = [os.path.join(tmp, f"{i}.png") for i in range(len(urls))]
            for url, shot in zip(urls, shots):
                proc = chromium(f"--screenshot={shot}", url, height=height)
                if proc.returncode != 0 or not os.path.exists(shot):
                    raise SystemExit(f"chromium failed: {proc.stderr[-2000:]}")
            side_by_side(shots, args.out)
        if args.dom_out:
            with open(args.dom_out, "w") as f:
                f.writelines(chromium("--dump-dom", url, height=height).stdout for url in urls)
        shown = "" if len(urls) == 1 else f" beside its latest {args.image!r} image"
        what = "compare view" if args.sweep else "page"
        print(f"wrote {args.out}: {what} of {len(names)} run(s) ({', '.join(sorted(names))}){shown}")

    if args.server:
        shoot(args.server)
    else:
        with mlflow_server(tracking_uri) as server:
            shoot(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

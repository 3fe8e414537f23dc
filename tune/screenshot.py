"""Screenshot the MLflow UI's run-comparison page for a sweep, with headless Chromium.

    python tune/screenshot.py --sweep lr-sched --out sweep-compare.png      # MLflow store from MLFLOW_TRACKING_URI
    python tune/screenshot.py --sweep lr-sched --tracking-uri sqlite:///mlflow.db --dom-out page.html

It starts `mlflow server` on 127.0.0.1 over the sweep's tracking store (unless --server
points at a running one), opens the compare view of the sweep's trial runs, and writes a
PNG (and, with --dom-out, the rendered page). Chromium: `apt-get install chromium`.
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

from diffusion.platform.cli import parser
from diffusion.platform.net import free_port, wait_for_http


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


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("Chromium not found: install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1600,1400",
            "--virtual-time-budget=20000",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--sweep", required=True, help="the sweep's --name")
    p.add_argument("--out", default="sweep-compare.png", help="PNG to write")
    p.add_argument("--dom-out", default=None, help="also write the rendered page's HTML here")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--server", default=None, help="a running MLflow server to use instead of starting one")
    p.add_argument("--experiment", default="ray-diffusion", help="MLflow experiment of the sweep")
    args = p.parse_args(argv)

    import mlflow

    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()

    def shoot(server: str) -> None:
        url, names = compare_url(server, tracking_uri, args.sweep, args.experiment)
        proc = chromium(f"--screenshot={os.path.abspath(args.out)}", url)
        if proc.returncode != 0 or not os.path.exists(args.out):
            raise SystemExit(f"chromium failed: {proc.stderr[-2000:]}")
        if args.dom_out:
            with open(args.dom_out, "w") as f:
                f.write(chromium("--dump-dom", url).stdout)
        print(f"wrote {args.out}: compare view of {len(names)} runs ({', '.join(sorted(names))})")

    if args.server:
        shoot(args.server)
    else:
        with mlflow_server(tracking_uri) as server:
            shoot(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a job's log shows: the project's own lines, and Ray's only with --verbose.

A Ray driver prints what every Ray process writes, each line after `(ActorName pid=N, ip=...)`.
The project writes its lines in Ray's processes to stdout (`project_lines_to_stdout` for its
logger; print() already does); Ray writes its own to stderr: its loggers (Ray Train's
controller, Ray Data's executor, a line for every checkpoint and report), its C++ core's
messages and Python's warnings. Unless verbose, the driver shows its workers' stdout only
(`WorkerOutput`) and says once where its processes' logs are, and Ray's, Serve's and MLflow's INFO
lines on the driver go too (`quiet_driver`). Ray's reports of dead workers or tasks and of
resources it cannot schedule (`(raylet) ...`, `(autoscaler ...)`) are not workers' stderr and
still show; of the raylet's, only its advice that many worker processes have started (said when a
busy machine starts Ray Data's workers slowly) goes with Ray's lines.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

PROJECT_LOGGER = "ray_diffusion"
RAY_PRINT_LOGS = "ray_print_logs"  # the name ray.init gives the driver's printer of its workers' output

# Said at every local start ("Set RAY_AUTH_MODE=disabled to opt out"): nothing to act on.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

# The raylet's "WARNING: 12 PYTHON worker processes have been started on node ...": advice, not a fault.
WORKER_POOL_ADVICE = "worker processes have been started on node"


def project_lines_to_stdout() -> logging.Logger:
    """The project's logger in a Ray worker, writing its lines (the message alone) to stdout."""
    log = logging.getLogger(PROJECT_LOGGER)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # not also to stderr by the root logger's handler that Ray Train adds
    return log


def quiet_driver() -> None:
    """Before ray.init (which sets the `ray` logger's level): no INFO lines from Serve or MLflow
    on this process, and not Ray's notice about its own default of token authentication."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read where MLflow is first imported
    for name in ("ray.serve", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)


class WorkerOutput:
    """The driver's printer of its workers' output (`show`, Ray's own) for their stdout alone:
    the first time a worker's stderr is dropped, one line says how to see it."""

    def __init__(self, show: Callable[[dict], None], logs_dir: str):
        self.show, self.logs_dir, self.hidden = show, logs_dir, 0

    def __call__(self, data: dict) -> None:
        if not data.get("is_err"):
            self.show(data)
            return
        lines = data.get("lines", ())
        if lines and not self.hidden:
            print(
                f"Ray's own log lines are hidden (--verbose shows them; its processes' logs are in {self.logs_dir})",
                flush=True,
            )
        self.hidden += len(lines)


def hide_workers_stderr() -> None:
    """After ray.init: replace Ray's printer of the workers' output by a `WorkerOutput` over it;
    nothing where this Ray prints none (log_to_driver=False, a ray:// client) or prints it some
    other way."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == RAY_PRINT_LOGS]
    if len(printers) != 1:
        return
    output = WorkerOutput(printers[0], ray_worker._global_node.get_logs_dir_path())
    dispatcher.remove_handler(RAY_PRINT_LOGS)
    dispatcher.add_handler(RAY_PRINT_LOGS, output)  # the same name: ray.shutdown removes it


class WithoutPoolAdvice:
    """Ray's printer of the raylet's messages to the driver (`show`: `print_to_stdstream`, which its
    error listener calls), but for its advice that many worker processes have started."""

    def __init__(self, show: Callable[[dict, bool], None]):
        self.show = show

    def __call__(self, data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines") or [""]
        if not (data.get("pid") == "raylet" and all(WORKER_POOL_ADVICE in line for line in lines)):
            self.show(data, ignore_prefix)


def hide_worker_pool_advice(hidden: bool) -> None:
    """After ray.init: Ray's printer of the raylet's messages without (`hidden`) or with its
    worker-pool advice; nothing where this Ray prints them some other way."""
    from ray._private import worker as ray_worker

    show = getattr(ray_worker, "print_to_stdstream", None)
    if show is None:
        return
    original = show.show if isinstance(show, WithoutPoolAdvice) else show
    ray_worker.print_to_stdstream = WithoutPoolAdvice(original) if hidden else original

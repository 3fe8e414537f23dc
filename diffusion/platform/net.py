"""Local ports and HTTP readiness: the helpers the local stack, the tools and the tests share."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None, any_status: bool = True) -> None:
    """Poll `url` until it answers: with any HTTP status, or (any_status=False) with a 2xx one.
    TimeoutError after `timeout` seconds, ChildProcessError as soon as `proc` (the server, when
    we started it) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError as e:  # HTTPError (an answer) is one too
            if isinstance(e, urllib.error.HTTPError) and any_status:
                return  # it answers
            if proc is not None and proc.poll() is not None:
                raise ChildProcessError(f"{url}: the server exited with code {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.5)

"""What every command line shares: bad input as one line and exit code 1, Ctrl-C 130, a Ray
that cannot be started or reached named with the fix."""

import pytest

from diffusion.errors import InputError
from diffusion.platform import cli, resources


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_input():
        raise InputError("data/x has no manifest.json: prepare it first")

    with pytest.raises(SystemExit) as e:
        cli.run(bad_input)
    assert e.value.code == 1 and capsys.readouterr().err == "error: data/x has no manifest.json: prepare it first\n"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.run(bug)


def test_a_ray_that_cannot_start_is_named_with_the_fix(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(resources.RayStartError) as e:
        resources.connect()
    message = str(e.value)
    assert "the Ray cluster at RAY_ADDRESS=10.0.0.1:6379 (Could not find any running Ray instance.)" in message
    assert "unset RAY_ADDRESS for a local Ray" in message and "more detail" not in message

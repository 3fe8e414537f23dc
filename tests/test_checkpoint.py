"""Unusable checkpoints: each a CheckpointError that names the file, what is wrong and the fix
(never `weights_only=False`), from the library and, as one line without a traceback, from
every command line that takes --checkpoint, before any of them starts Ray."""

import os

import pytest
import torch

from diffusion import read_checkpoint
from diffusion.checkpoint import CheckpointError
from helpers import run_main, tiny_checkpoint


class Malicious:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture
def payload(tmp_path):
    return torch.load(f"{tiny_checkpoint(tmp_path / 'good')}/checkpoint.pt", weights_only=True)


def bad_files(tmp_path, payload) -> dict:
    files = {
        "empty": (b"", "is empty"),
        "truncated": (None, "not a readable PyTorch checkpoint, truncated or damaged"),
        "no-ema": ({k: v for k, v in payload.items() if k != "ema"}, "lacks ['ema']"),
        "no-recipe": ({k: v for k, v in payload.items() if k != "recipe"}, "lacks ['recipe']"),
        "unknown-recipe": (
            {**payload, "recipe": {**payload["recipe"], "bogus": 1}},
            "unknown recipe option(s) ['bogus']",
        ),
        "mismatched": ({**payload, "ema": dict(list(payload["ema"].items())[:-1])}, "'ema' weights do not fit"),
        "malicious": ({"model": Malicious()}, "holds Python objects other than tensors"),
        "a-list": ([1, 2], "holds a list, not a checkpoint dict"),
    }
    paths = {}
    for name, (content, message) in files.items():
        path = tmp_path / f"{name}.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            torch.save(payload, path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            torch.save(content, path)
        paths[name] = (path, message)
    return paths


def test_every_unusable_checkpoint_is_named_with_the_problem(tmp_path, payload):
    for name, (path, message) in bad_files(tmp_path, payload).items():
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        assert str(path) in str(e.value) and message in str(e.value), name
        assert "weights_only=False" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()  # the pickle never ran


@pytest.mark.parametrize(
    "command",
    [
        ["jobs/sample.py", "--out", "OUT"],
        ["jobs/serve.py", "--port", "1"],
        ["jobs/evaluate.py", "--data", "DATA", "--inception-weights", "WEIGHTS"],
        ["jobs/export.py", "--out", "OUT"],
    ],
    ids=lambda c: c[0],
)
def test_every_cli_refuses_a_malicious_checkpoint_in_one_line(tmp_path, payload, command):
    path, message = bad_files(tmp_path, payload)["malicious"]
    (tmp_path / "weights").write_bytes(b"not read")
    args = [{"OUT": tmp_path / "out", "DATA": tmp_path, "WEIGHTS": tmp_path / "weights"}.get(a, a) for a in command[1:]]
    proc = run_main(command[0], "--checkpoint", path, *args)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith(f"error: {path} holds Python objects") and "Ray" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()

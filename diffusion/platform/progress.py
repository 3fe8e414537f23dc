"""Progress of the long-running parts (downloads, preparing data, sampling, Inception features):
a tqdm bar on a terminal, and in a log (no terminal: `ray job submit`, CI, a file) a plain line
every `log_every_s` seconds and at the end, instead of a bar's carriage returns.
`model_calls` counts a Pipeline's model calls (its steps); `sample_figures` prints what the
papers' figures will cost before it samples them, and counts their calls."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _Lines:
    """A file for tqdm that turns each redraw into one line of its own (the final state once)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int | None, desc: str, unit: str = "it", log_every_s: float = 10.0, **kwargs):
    """A tqdm progress bar (a context manager; `.update(n)`) with totals, rates and ETAs."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(sys.stderr),
        mininterval=log_every_s,
        ncols=100,
        ascii=True,
        **kwargs,
    )


@contextmanager
def model_calls(pipeline, total: int, desc: str):
    """A progress bar of `total` model calls that `pipeline` makes in this thread."""
    with progress(total, desc, unit="call") as bar, pipeline.observed(lambda: bar.update(1)):
        yield bar


def sample_figures(pipeline, plan, pair=None) -> Iterator:
    """The figures of `plan` (diffusion.figures), each as soon as it is sampled, after a line
    of what they cost (model calls, and time at a call's speed measured here) and the rows
    chosen; a progress bar counts the calls."""
    from ..figures import figures

    calls = plan.calls()
    total, seconds = sum(calls.values()), pipeline.call_seconds()
    print(
        f"figures: {total} model calls on batches of {pipeline.batch_size} "
        f"({', '.join(f'{name} {n}' for name, n in calls.items())}), about {total * seconds / 60:.1f} min "
        f"at {seconds:.3f} s a call on {pipeline.device}; rows: {plan.describe()}",
        flush=True,
    )
    with model_calls(pipeline, total, "figures"):
        yield from figures(pipeline, plan, pair)

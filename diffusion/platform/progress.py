"""Progress of the long-running parts (downloads, preparing data, sampling, Inception features):
a tqdm bar on a terminal, and in a log (no terminal: `ray job submit`, CI, a file) a plain line
every `log_every_s` seconds and at the end, instead of a bar's carriage returns."""

from __future__ import annotations

import sys


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

"""What to draw from a class-conditional model: its classes by name or index, and the images a
request names, each a (class, seed) pair.

Every entry point (jobs/generate.py, the batch job, evaluation, Serve, the MLflow model) asks
for classes the same way: names or indices, and ranges FIRST-LAST of indices, comma-separated
(`0-9`, `cat,dog`, `airplane,3-5`). Given classes, each class is drawn from every seed (the class
x seed grid); given none, each seed draws class seed mod K, so that the classes take turns and an
image is still named by its (class, seed).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import OptionError

UNCONDITIONAL = (
    "this checkpoint is unconditional (trained without classes): it cannot be asked for a class; "
    "drop the classes, or train a model with --num-classes"
)


def describe(names: Sequence[str]) -> str:
    """A model's classes in words, for an error message: 'the model's 10 classes are 0 airplane, ...'
    (a name alone where it is its index, as the digits')."""
    listed = (name if name == str(i) else f"{i} {name}" for i, name in enumerate(names))
    return f"the model's {len(names)} classes are " + ", ".join(listed)


def parse(spec: str | Sequence[str | int]) -> list[str]:
    """The items of a class spec: a comma-separated string, or a list of names and indices."""
    items = spec.split(",") if isinstance(spec, str) else [str(item) for item in spec]
    items = [item.strip() for item in items]
    if not items or not all(items):
        raise OptionError(f"classes {spec!r} has an empty item: give names or indices, e.g. 0-9 or cat,dog")
    return items


def resolve(spec: str | Sequence[str | int], names: Sequence[str]) -> list[int]:
    """The class indices a spec names (`parse`), in its order, against a model's class `names`:
    a name, an index, or a range FIRST-LAST of indices; an OptionError names anything else, and
    the valid classes."""
    if not names:
        raise OptionError(UNCONDITIONAL)
    indices = []
    for item in parse(spec):
        if item in names:
            indices.append(list(names).index(item))
            continue
        first, dash, last = item.partition("-")
        if first.isdigit() and (last.isdigit() if dash else not dash):
            span = range(int(first), int(last if dash else first) + 1)
            if span and span[-1] < len(names):
                indices.extend(span)
                continue
        raise OptionError(f"no class {item!r}: {describe(names)}")
    return indices


def images(seeds: Sequence[int], classes: Sequence[int] | None, num_classes: int) -> tuple[list[int], list[int] | None]:
    """The (seeds, classes) of the images asked for, one entry each: for a conditional model
    every seed of each of `classes` (class-major), or, with none given, each seed with class
    seed mod `num_classes`; for an unconditional one the seeds alone (classes None)."""
    if not num_classes:
        return list(seeds), None
    if classes is None:
        return list(seeds), [seed % num_classes for seed in seeds]
    return [seed for _ in classes for seed in seeds], [c for c in classes for _ in seeds]


def rows(classes: Sequence[int], per_row: int = 10) -> list[list[int]]:
    """A grid of one row per class, in the order the classes first appear: the indices of each
    class's first images, as many in every row (at most `per_row`)."""
    grid: dict[int, list[int]] = {}
    for i, c in enumerate(classes):
        grid.setdefault(c, []).append(i)
    width = min(per_row, *(len(row) for row in grid.values()))
    return [row[:width] for row in grid.values()]

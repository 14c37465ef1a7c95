"""Deterministic, nested shot selection.

Rule: take the normal training files sorted by file name, shuffle that list with
``random.Random(f"{category}:{seed}").shuffle`` and use the first k entries as the k-shot set.

Why this rule:
* deterministic across machines and runs: a str seed is hashed with SHA-512 by ``random`` (not by
  ``hash()``, so PYTHONHASHSEED has no effect) and ``Random.shuffle`` is stable across CPython 3.x;
* nested: for one seed the k-shot set is a prefix of one fixed permutation, so
  1-shot ⊂ 2-shot ⊂ 4-shot ⊂ ..., and a shot-count ablation measures the shot count, not luck;
* independent per category: the category name is part of the seed;
* only file names matter (not the root path), and every mode gets the same shots.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path


def shot_permutation(files: Sequence[str | Path], *, category: str, seed: int) -> list[Path]:
    """The fixed per-(category, seed) order of the normal training files."""
    ordered = sorted((Path(f) for f in files), key=lambda p: p.name)
    names = [p.name for p in ordered]
    if len(set(names)) != len(names):
        raise ValueError("file names must be unique (selection is defined on file names)")
    random.Random(f"{category}:{seed}").shuffle(ordered)
    return ordered


def select_shots(files: Sequence[str | Path], k: int, *, category: str, seed: int) -> list[Path]:
    """The k-shot set: the first k files of ``shot_permutation`` (k=0 gives [] for zero-shot)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > len(files):
        raise ValueError(f"asked for {k} shots of {category!r} but only {len(files)} normal images exist")
    return shot_permutation(files, category=category, seed=seed)[:k]

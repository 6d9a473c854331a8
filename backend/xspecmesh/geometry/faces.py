"""Index triangles (F, 3): the two checks the tokenizer, the welds, the fit and the metrics share (numpy only, so
the tokenizer stays light)."""
from __future__ import annotations

import numpy as np


def proper(faces) -> np.ndarray:
    """Mask of the faces whose three corners are distinct; the others are degenerate (an edge or a point)."""
    f = np.asarray(faces).reshape(-1, 3)
    return (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])


def first_of_repeats(faces) -> np.ndarray:
    """Indices, in input order, of the first face on each set of three corners (any order, either winding)."""
    f = np.asarray(faces).reshape(-1, 3)
    if len(f) == 0:
        return np.zeros(0, np.int64)
    _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    return np.sort(first)

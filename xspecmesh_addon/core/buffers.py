"""Triangles streamed from the backend → arrays Blender can take in one call.

Bpy-free (numpy only) so it is tested without Blender. The backend sends complete triangles as vertex coordinates in
the normalized frame, a few at a time; `TriangleBuffer` appends them to one growing array. While a job runs the mesh
is shown as a triangle soup (three vertices per face, cheap to append); at the end `weld` merges coincident vertices
and drops faces that became degenerate or repeat an earlier one.
"""
from __future__ import annotations

import numpy as np

# The backend's vertices sit on 7-bit bin centres (bin width 2/128 ≈ 0.0156 in the normalized frame), so coincident
# vertices match exactly; the tolerance only absorbs float noise from the JSON round trip.
WELD_TOLERANCE = 1e-5


class TriangleBuffer:
    """Append-only float32 array of triangles, shape (F, 3, 3), with amortized doubling."""

    def __init__(self, capacity: int = 256):
        self._data = np.empty((max(1, capacity), 3, 3), dtype=np.float32)
        self._count = 0
        self._shown = 0  # triangles already handed to the viewport

    def __len__(self) -> int:
        return self._count

    @property
    def triangles(self) -> np.ndarray:
        """A read-only view of the triangles received so far."""
        view = self._data[: self._count]
        view.flags.writeable = False
        return view

    def extend(self, triangles) -> int:
        """Append triangles (anything shaped (k, 3, 3)); non-finite ones are dropped. Returns how many were kept."""
        tris = np.asarray(triangles, dtype=np.float32)
        if tris.size == 0:
            return 0
        tris = tris.reshape(-1, 3, 3)
        tris = tris[np.isfinite(tris).all(axis=(1, 2))]
        need = self._count + len(tris)
        if need > len(self._data):
            grown = np.empty((max(need, 2 * len(self._data)), 3, 3), dtype=np.float32)
            grown[: self._count] = self._data[: self._count]
            self._data = grown
        self._data[self._count : need] = tris
        self._count = need
        return len(tris)

    def replace(self, triangles) -> bool:
        """Overwrite every triangle received so far with new positions (same count and order, all finite), e.g. the
        backend's fitted mesh. Returns False, changing nothing, when they do not match."""
        tris = np.asarray(triangles, dtype=np.float32)
        if tris.shape != (self._count, 3, 3) or not np.isfinite(tris).all():
            return False
        self._data[: self._count] = tris
        self._shown = 0  # everything changed: the next refresh rebuilds
        return True

    @property
    def dirty(self) -> bool:
        """True when triangles arrived since the last `mark_shown`."""
        return self._shown != self._count

    def mark_shown(self) -> None:
        self._shown = self._count


def soup(triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, 3, 3) triangles → vertices (3F, 3) and faces (F, 3), every face with its own three vertices."""
    tris = np.asarray(triangles, dtype=np.float32).reshape(-1, 3, 3)
    verts = tris.reshape(-1, 3)
    faces = np.arange(len(verts), dtype=np.int32).reshape(-1, 3)
    return verts, faces


def weld(triangles: np.ndarray, tolerance: float = WELD_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices closer than `tolerance` (per axis, on a grid), drop degenerate and duplicate faces. (Numpy only:
    Blender's Python lacks the scipy the backend's `xspecmesh.geometry.mesh.weld` clusters with.)

    Winding is kept; of two faces over the same three vertices (in any order) the first one stays.
    Returns vertices (V, 3) float32 and faces (F, 3) int32, every vertex referenced.
    """
    tris = np.asarray(triangles, dtype=np.float64).reshape(-1, 3, 3)
    if len(tris) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    points = tris.reshape(-1, 3)
    keys = np.round(points / tolerance).astype(np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1, 3)
    degenerate = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    faces = faces[~degenerate]
    _, keep = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    faces = faces[np.sort(keep)]
    used, faces = np.unique(faces, return_inverse=True)  # drop unreferenced vertices, renumber
    verts = points[first[used]]
    return verts.astype(np.float32), faces.reshape(-1, 3).astype(np.int32)


def transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 4×4 affine matrix to (N, 3) points."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return p @ m[:3, :3].T + m[:3, 3]

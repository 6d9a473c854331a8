"""Fit a generated mesh to the surface it was made from: the model chooses the topology, this moves its vertices.

The model places each coordinate on a 128-level grid read off the point cloud, and a small model reads it a few
levels off (see docs/TRAINING.md). Retopology keeps the new mesh on the source surface (what Blender's Shrinkwrap does
by hand), so after decoding we move the welded vertices, faces and connectivity unchanged, to minimise a symmetric
point-to-plane distance to the input points: an ICP in which every iteration is one linear least-squares solve, since
points sampled at fixed barycentric weights are linear in the vertex positions.

    result → source: every sample s on a face is pulled onto the tangent plane of its nearest input point p
    source → result: every input point p pulls its nearest sample onto p's tangent plane
    plus a small point-to-point share (keeps points from sliding along planes) and damping towards the last iterate

Normals come with the points (the server and the CLI have them), so no normal estimation is needed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.sparse import block_diag, coo_matrix, diags, hstack, identity
from scipy.sparse.linalg import spsolve
from scipy.spatial import cKDTree

from xspecmesh.geometry.faces import proper


@dataclass
class FitConfig:
    iterations: int = 20
    samples: int = 4000  # barycentric samples over the result (area-weighted, at least a few per face)
    point_share: float = 0.1  # weight of the point-to-point residual next to the point-to-plane one
    damping: float = 0.02  # pull towards the previous iterate, relative to the data term's mean diagonal (any size)
    max_move: float = 0.25  # no vertex moves farther than this from where the model put it (normalized units)
    max_points: int = 8192  # a larger cloud is subsampled (evenly, deterministically)


def fit_to_points(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray,
                  config: FitConfig | None = None) -> np.ndarray:
    """New positions for `vertices` (n, 3) of a mesh with `faces` (m, 3), fitted to `points` (N, 6: xyz + unit normal).

    Same frame in and out. Vertices used by no face keep their position.
    """
    cfg = config or FitConfig()
    v0 = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    points = np.asarray(points, dtype=np.float64)[:: max(1, -(-len(points) // cfg.max_points))]
    pts, nrm = points[:, :3], points[:, 3:6]
    nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)  # every plane row weighs the same
    if len(faces) == 0 or len(pts) == 0:
        return v0.copy()
    tree = cKDTree(pts)
    weights, sample_face = _barycentric_samples(v0, faces, cfg.samples)
    rows = np.repeat(np.arange(len(sample_face)), 3)
    W = coo_matrix((weights.ravel(), (rows, faces[sample_face].ravel())), shape=(len(sample_face), len(v0))).tocsr()
    n = len(v0)
    v = v0.copy()
    for _ in range(cfg.iterations):
        s = W @ v
        _, near_pt = tree.query(s)  # result → source
        _, near_s = cKDTree(s).query(pts)  # source → result
        A_rows = [W, W[near_s]]
        targets = [pts[near_pt], pts]
        normals = [nrm[near_pt], nrm]
        scale = [1.0 / len(s), 1.0 / len(pts)]
        # Point-to-plane: (n · (A v - p))^2 couples x, y, z; stack the three coordinates as one 3n unknown vector.
        blocks, rhs = [], []
        for A, p, nn, w in zip(A_rows, targets, normals, scale):
            plane = _plane_rows(A, nn)
            blocks.append((plane.T @ plane) * w)
            rhs.append(plane.T @ np.sum(nn * p, axis=1) * w)
            point = _point_rows(A)
            blocks.append((point.T @ point) * w * cfg.point_share)
            rhs.append(point.T @ p.T.ravel() * w * cfg.point_share)
        data = sum(blocks)
        damping = cfg.damping * float(data.diagonal().mean())
        v = spsolve((data + identity(3 * n) * damping).tocsc(), sum(rhs) + damping * v.T.ravel()).reshape(3, n).T
        if not np.isfinite(v).all():
            raise FloatingPointError("the least-squares solve gave non-finite positions")
    step = v - v0
    length = np.linalg.norm(step, axis=1, keepdims=True)
    step *= np.minimum(1.0, cfg.max_move / np.maximum(length, 1e-12))  # clamped, not undone: no spikes
    step[np.setdiff1d(np.arange(n), faces.ravel())] = 0.0
    return v0 + step


def fit_triangles(triangles: np.ndarray, points: np.ndarray,
                  config: FitConfig | None = None) -> tuple[np.ndarray, dict]:
    """Fit a triangle soup as decoded (T, 3, 3): corners at the same position are one vertex (the decoder emits grid
    values, so equal means exactly equal). Returns the fitted soup, same order and shape, and statistics: seconds,
    and the mean symmetric distance between surface samples and points before and after (normalized units)."""
    start = time.perf_counter()
    tris = np.asarray(triangles, dtype=np.float64).reshape(-1, 3, 3)
    if len(tris) == 0:
        return tris.astype(np.float32), {"fit_seconds": 0.0}
    vertices, corner = np.unique(tris.reshape(-1, 3), axis=0, return_inverse=True)
    faces = corner.reshape(-1, 3)
    kept = faces[proper(faces)]
    fitted = fit_to_points(vertices, kept, points, config)
    stats = {"fit_distance_before": surface_distance(vertices, kept, points),
             "fit_distance_after": surface_distance(fitted, kept, points),
             "fit_seconds": round(time.perf_counter() - start, 4)}
    return fitted[faces].astype(np.float32), stats


def fit_result(triangles: np.ndarray, points: np.ndarray, stats: dict,
               config: FitConfig | None = None) -> tuple[np.ndarray | None, dict]:
    """The fit as the server and the CLI apply it to a finished decode: (fitted soup or None, stats to add).

    Not for a mesh cut at the face or token limit, or where its decode stalled (`stats["complete"]` False): the part
    of the surface it does not cover would pull its open border outwards. A fit that fails or gives non-finite
    positions leaves the mesh as decoded; the stats say why."""
    if not stats.get("complete", False):
        why = ("its decode stalled (a loop that made no face)" if stats.get("stalled")
               else "the mesh stopped at the face or token limit")
        return None, {"fit_skipped": f"{why}, so it is left as decoded"}
    if len(triangles) == 0:
        return None, {}
    try:
        fitted, fit_stats = fit_triangles(triangles, points, config)
    except Exception as exc:  # the decoded mesh is still good
        return None, {"fit_error": f"{type(exc).__name__}: {exc}"}
    return fitted, fit_stats


def surface_distance(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray,
                     samples: int = 4000) -> float | None:
    """Mean of the two one-sided mean nearest-neighbour distances between surface samples and the points, rounded to
    5 decimals; None without faces."""
    if len(faces) == 0:
        return None
    weights, owner = _barycentric_samples(vertices, faces, samples)
    s = np.einsum("sk,skd->sd", weights, vertices[faces[owner]])
    pts = np.asarray(points[:, :3], np.float64)
    return round(0.5 * float(cKDTree(pts).query(s)[0].mean() + cKDTree(s).query(pts)[0].mean()), 5)


def _barycentric_samples(v: np.ndarray, faces: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (deterministic) barycentric weights: faces get samples in proportion to area, at least 3 each."""
    area = 0.5 * np.linalg.norm(np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]]), axis=1)
    per_face = np.maximum(3, np.round(count * area / max(area.sum(), 1e-12))).astype(int)
    owner = np.repeat(np.arange(len(faces)), per_face)
    i = np.arange(len(owner)) - np.repeat(np.cumsum(per_face) - per_face, per_face) + 0.5  # index within its face
    a, b = (i * 0.7548776662) % 1.0, (i * 0.5698402910) % 1.0  # a low-discrepancy (Kronecker) sequence
    flip = a + b > 1  # folded into the triangle
    a[flip], b[flip] = 1 - a[flip], 1 - b[flip]
    return np.stack([1 - a - b, a, b], 1), owner


def _plane_rows(A, normals: np.ndarray):
    """Rows r with r · [vx; vy; vz] = n · (A v)."""
    return hstack([diags(normals[:, k]) @ A for k in range(3)]).tocsr()


def _point_rows(A):
    """Rows r with r · [vx; vy; vz] = [A vx; A vy; A vz] (the three coordinates stacked)."""
    return block_diag([A, A, A]).tocsr()

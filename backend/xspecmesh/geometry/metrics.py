"""Quality metrics for generated meshes.

Geometry: both meshes are normalized on their own (bbox centre, longest side to [-0.95, 0.95]) and compared through
area-weighted surface samples. `cd`/`hd` follow BPT's protocol at 1024 samples per mesh; because its sampling floor
is high (a mesh against itself scores about CD 0.065), the same metrics are also reported at 10k samples together with
normal consistency and F-score. A failed generation (None, no faces, zero area) is returned as a row with
`failed: True` and NaN metrics, so callers count it instead of silently dropping it.

Topology: face and vertex counts, non-manifold and boundary edges, degenerate and duplicate faces, bodies.
"""
from __future__ import annotations

import numpy as np
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from xspecmesh.errors import MeshError
from xspecmesh.geometry.faces import first_of_repeats, proper

BPT_SAMPLES = 1024  # samples per mesh in BPT's published numbers
DENSE_SAMPLES = 10_000  # our lower-floor companion metrics
FSCORE_TAU = 0.02  # F-score distance threshold in the normalized frame (longest side 1.9)

GEOMETRY_KEYS = ("cd", "hd", "cd_10k", "hd_10k", "normal_consistency", "fscore")


def chamfer_hausdorff(points_a: np.ndarray, points_b: np.ndarray) -> tuple[float, float]:
    """Chamfer (mean NN distance a→b plus mean b→a, L2, not squared) and symmetric Hausdorff of two point sets."""
    d_ab, d_ba = _nn_distances(np.asarray(points_a)[:, :3], np.asarray(points_b)[:, :3])
    return float(d_ab.mean() + d_ba.mean()), float(max(d_ab.max(), d_ba.max()))


def evaluate(pred: trimesh.Trimesh | None, ref: trimesh.Trimesh, seed: int = 0) -> dict:
    """Compare a generated mesh with its reference. Always returns every key in `GEOMETRY_KEYS` plus `failed`."""
    ref_n = _normalized(ref)
    if ref_n is None:
        raise MeshError("reference mesh is empty or has zero area")
    pred_n = _normalized(pred)
    if pred_n is None:
        return {"failed": True, **{k: float("nan") for k in GEOMETRY_KEYS}}

    from xspecmesh.geometry.mesh import sample_surface

    # Different seeds for the two meshes: a mesh compared with itself must not get identical samples.
    pa = sample_surface(pred_n, BPT_SAMPLES, seed=seed)
    pb = sample_surface(ref_n, BPT_SAMPLES, seed=seed + 1)
    cd, hd = chamfer_hausdorff(pa, pb)

    da = sample_surface(pred_n, DENSE_SAMPLES, seed=seed + 2)
    db = sample_surface(ref_n, DENSE_SAMPLES, seed=seed + 3)
    d_ab, i_ab = cKDTree(db[:, :3]).query(da[:, :3], workers=1)
    d_ba, i_ba = cKDTree(da[:, :3]).query(db[:, :3], workers=1)
    # Orientation-free: a flipped triangle is a topology problem, not a shape one (counted by `topology`).
    nc_ab = np.abs(np.sum(da[:, 3:] * db[i_ab, 3:], axis=1)).mean()
    nc_ba = np.abs(np.sum(db[:, 3:] * da[i_ba, 3:], axis=1)).mean()
    precision = float((d_ab < FSCORE_TAU).mean())  # generated samples close to the reference
    recall = float((d_ba < FSCORE_TAU).mean())  # reference samples covered by the generation
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        "failed": False,
        "cd": cd,
        "hd": hd,
        "cd_10k": float(d_ab.mean() + d_ba.mean()),
        "hd_10k": float(max(d_ab.max(), d_ba.max())),
        "normal_consistency": float((nc_ab + nc_ba) / 2),
        "fscore": float(fscore),
    }


def topology(mesh: trimesh.Trimesh) -> dict:
    """Counts that tell a clean mesh from a broken one.

    Coincident vertices are welded (exact positions) before edges are counted, so a triangle soup read from STL is
    judged by its shape, not its storage. `vertices` is the welded count of referenced vertices. A degenerate face
    repeats a vertex or has zero area; a duplicate face uses the same three vertices as an earlier one (any order);
    bodies are groups of faces connected through shared vertices.
    """
    verts = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return {"faces": 0, "vertices": 0, "non_manifold_edges": 0, "boundary_edges": 0, "degenerate_faces": 0,
                "duplicate_faces": 0, "bodies": 0}
    _, weld = np.unique(verts, axis=0, return_inverse=True)
    f = weld.reshape(-1)[faces]

    repeated = ~proper(f)
    tri = verts[faces]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    scale = max(float(np.ptp(verts[faces.reshape(-1)], axis=0).max()), 1e-300)
    degenerate = repeated | (area2 <= 1e-12 * scale * scale)

    good = f[~repeated]
    duplicates = len(good) - len(first_of_repeats(good))

    edges = np.sort(np.concatenate([good[:, [0, 1]], good[:, [1, 2]], good[:, [2, 0]]]), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)

    used = np.unique(f)
    n = int(weld.max()) + 1
    rows = np.concatenate([f[:, 0], f[:, 1]])
    cols = np.concatenate([f[:, 1], f[:, 2]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return {
        "faces": int(len(faces)),
        "vertices": int(len(used)),
        "non_manifold_edges": int((uses > 2).sum()),
        "boundary_edges": int((uses == 1).sum()),
        "degenerate_faces": int(degenerate.sum()),
        "duplicate_faces": int(duplicates),
        "bodies": int(len(np.unique(labels[used]))),
    }


def soup(triangles: np.ndarray) -> trimesh.Trimesh:
    """(T, 3, 3) triangles as a mesh of 3T vertices (`topology` welds equal positions itself)."""
    tris = np.asarray(triangles, dtype=np.float64).reshape(-1, 3)
    return trimesh.Trimesh(tris, np.arange(len(tris)).reshape(-1, 3), process=False)


def closed(triangles: np.ndarray) -> bool:
    """Watertight after welding equal vertices: some faces, and every edge used by exactly two of them."""
    t = topology(soup(triangles))
    return t["faces"] > 0 and t["boundary_edges"] == 0 and t["non_manifold_edges"] == 0


def distance_to_points(triangles: np.ndarray, points: np.ndarray, samples: int = 2048, seed: int = 0) -> float:
    """Chamfer distance between a decoded mesh's surface and the point cloud it was decoded from, both in the
    normalized frame: how well a result covers its input without the reference mesh (inf for no surface)."""
    from xspecmesh.geometry.mesh import sample_surface

    try:
        ours = sample_surface(soup(triangles), samples, seed=seed)
    except MeshError:
        return float("inf")
    return chamfer_hausdorff(ours, np.asarray(points)[:, :3])[0]


def bbox_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The input's axis-aligned bounding box as a 12-triangle mesh: the floor any trained model must beat."""
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    if len(verts) == 0:
        raise MeshError("cannot take the bounding box of an empty mesh")
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    return trimesh.creation.box(bounds=np.stack([lo, hi]))


def _nn_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d_ab, _ = cKDTree(b).query(a, workers=1)
    d_ba, _ = cKDTree(a).query(b, workers=1)
    return d_ab, d_ba


def _normalized(mesh: trimesh.Trimesh | None) -> trimesh.Trimesh | None:
    """A copy in the BPT frame, or None where nothing can be sampled (no mesh, no faces, zero area, NaN)."""
    if mesh is None or len(getattr(mesh, "faces", ())) == 0:
        return None
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    if not np.isfinite(verts).all() or not mesh.area > 0:
        return None
    from xspecmesh.geometry.mesh import normalize

    try:
        normalized, _ = normalize(verts)
    except MeshError:
        return None
    return trimesh.Trimesh(normalized, np.asarray(mesh.faces), process=False)

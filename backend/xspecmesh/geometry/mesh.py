"""Mesh and point-cloud I/O and geometry helpers: load, normalize, sample, weld, save.

Every unusable input raises one `MeshError` with a one-line message naming the file, so the CLI and the server can
report it as it is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import trimesh

from xspecmesh.errors import MeshError
from xspecmesh.geometry.faces import first_of_repeats, proper

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
BOUND = 0.95  # normalized meshes and point clouds span [-BOUND, BOUND] along their longest side


def _check_vertices(vertices: np.ndarray, what: str) -> None:
    if not np.isfinite(vertices).all():
        raise MeshError(f"{what}: NaN or infinite coordinates")
    if len(vertices) == 0 or float((vertices.max(0) - vertices.min(0)).max()) <= 0.0:
        raise MeshError(f"{what}: zero extent (all points coincide)")


def load_mesh(path, process: bool = True) -> trimesh.Trimesh:
    """Read obj/ply/stl/off/glb/gltf as one triangle mesh (scene parts concatenated, transforms applied).

    process=True merges duplicate vertices and drops degenerate faces; process=False returns the file's vertices and
    faces as they are (what the BPT tokenizer expects).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise MeshError(f"{path}: no such file")
    if ext not in MESH_EXTENSIONS:
        raise MeshError(f"{path}: unsupported mesh format {ext or '(none)'} (use {', '.join(MESH_EXTENSIONS)})")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many kinds; the user needs one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeshError(f"{path}: cannot read mesh ({reason})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise MeshError(f"{path}: no faces")
    faces = np.asarray(mesh.faces)
    if faces.min() < 0 or faces.max() >= len(mesh.vertices):
        raise MeshError(f"{path}: faces reference vertices that do not exist")
    _check_vertices(np.asarray(mesh.vertices), path)
    if process:
        mesh.merge_vertices()
        mesh.update_faces(mesh.nondegenerate_faces())
        mesh.remove_unreferenced_vertices()
        if len(mesh.faces) == 0:
            raise MeshError(f"{path}: no faces (all degenerate)")
    return mesh


def load_points(path) -> np.ndarray:
    """Read a .npy point cloud with normals, shape (N, 6): xyz then normal; returns float32."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MeshError(f"{path}: no such file")
    if not path.lower().endswith(".npy"):
        raise MeshError(f"{path}: point clouds must be .npy arrays of shape (N, 6)")
    try:
        points = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise MeshError(f"{path}: cannot read .npy ({type(exc).__name__})") from None
    if points.ndim != 2 or points.shape[1] != 6 or len(points) == 0 or not np.issubdtype(points.dtype, np.number):
        raise MeshError(f"{path}: expected a numeric (N, 6) array of xyz + normal, got {points.dtype} {points.shape}")
    points = points.astype(np.float32)
    _check_vertices(points[:, :3], path)
    if not np.isfinite(points[:, 3:]).all():
        raise MeshError(f"{path}: NaN or infinite normals")
    return points


@dataclass
class Normalization:
    """normalized = (points - center) * scale; `invert` maps back to the input frame."""

    center: np.ndarray
    scale: float

    def apply(self, points) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.center) * self.scale

    def invert(self, points) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale + self.center


def normalize(vertices) -> tuple[np.ndarray, Normalization]:
    """Centre the bounding box and scale its longest side to [-0.95, 0.95]."""
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    _check_vertices(vertices, "mesh")
    lo, hi = vertices.min(0), vertices.max(0)
    norm = Normalization(center=(lo + hi) / 2.0, scale=float(2.0 * BOUND / (hi - lo).max()))
    return norm.apply(vertices), norm


def sample_surface(mesh: trimesh.Trimesh, count: int, seed: int = 0) -> np.ndarray:
    """`count` points uniform over the surface (area-weighted) with their unit face normals: (count, 6) float32."""
    tris = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)]
    cross = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    area = np.linalg.norm(cross, axis=1)
    if len(area) == 0 or not area.sum() > 0:
        raise MeshError("mesh has no surface area to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(area), size=count, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)  # uniform barycentric coordinates
    w = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)
    points = np.einsum("nk,nkd->nd", w, tris[face])
    normals = cross[face] / area[face, None]
    return np.concatenate([points, normals], axis=1).astype(np.float32)


def weld(vertices, faces, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices closer than `tol`, drop degenerate and duplicate faces (same vertex set, first kept) and
    unreferenced vertices. Returns (vertices float64 (V, 3), faces int64 (F, 3))."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    n = len(vertices)
    pairs = cKDTree(vertices).query_pairs(tol, output_type="ndarray") if n else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    # Each cluster is represented by its first vertex; clusters keep the order of their first vertex.
    _, first = np.unique(label, return_index=True)
    rep = np.empty(len(first), np.int64)
    rep[label[first]] = first
    faces = label[faces]
    faces = faces[proper(faces)]
    faces = faces[first_of_repeats(faces)]
    alive = np.unique(faces)  # referenced clusters, then in the input order of their first vertex
    alive = alive[np.argsort(rep[alive], kind="stable")]
    remap = np.full(len(rep), -1, np.int64)
    remap[alive] = np.arange(len(alive))
    return vertices[rep[alive]], remap[faces]


def save_mesh(path, vertices, faces) -> None:
    """Write a triangle mesh; the format follows the extension (obj/ply/stl/off/glb/gltf)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in MESH_EXTENSIONS:
        raise MeshError(f"{path}: unsupported mesh format {ext or '(none)'} (use {', '.join(MESH_EXTENSIONS)})")
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64).reshape(-1, 3), np.asarray(faces, np.int64).reshape(-1, 3),
                           process=False)
    try:
        mesh.export(path)
    except OSError as exc:
        raise MeshError(f"{path}: cannot write ({exc.strerror or exc})") from None


def load_input(path, count: int, seed: int):
    """A mesh file (surface-sampled) or an N x 6 .npy cloud: points (count, 6) in the normalized frame and the
    Normalization that maps back to the input's frame."""
    if str(path).lower().endswith(".npy"):
        pts = load_points(path)
        xyz, norm = normalize(pts[:, :3])
        return np.concatenate([xyz, pts[:, 3:]], 1).astype(np.float32), norm
    mesh = load_mesh(path)
    xyz, norm = normalize(mesh.vertices)
    mesh.vertices = xyz
    return sample_surface(mesh, count, seed), norm


def welded(triangles, norm, tokens: int, what: str = ""):
    """A result's triangle soup (normalized frame) → welded (vertices, faces) in the input's frame; no faces is an
    error."""
    flat = triangles.reshape(-1, 3)
    vertices, faces = weld(norm.invert(flat), np.arange(len(flat)).reshape(-1, 3))
    if len(faces) == 0:
        raise MeshError(f"the model produced no faces{what} ({tokens} tokens)")
    return vertices, faces

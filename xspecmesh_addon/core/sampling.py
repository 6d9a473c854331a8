"""Evaluated Blender object → the backend's conditioning point cloud.

The mesh (modifiers applied) is read into numpy in world space — or, with "object axes", in the object's own axes
(its scale kept, its rotation and location left out) — sampled uniformly by area with geometric normals, and
normalized the way the model was trained: turned from Blender's z-up to the model's y-up, bbox centre to the origin,
longest side to [-0.95, 0.95]. `PointCloud.to_world` remembers all of it so the generated faces go back to the source.

No `import bpy` here: `object_triangles` only calls methods on the object it is given, and everything else is plain
numpy, so the math is tested without Blender. Blender's Python has neither trimesh nor scipy, so `Normalization`
and `sample_surface` are numpy-only counterparts of the backend's (xspecmesh.geometry.mesh), not imports of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Points sent per request. The backend resamples them to its encoder's input size (EncoderConfig.num_points: 2048
# for the shipped checkpoint, 4096 for BPT's) and fits the result against all of them.
POINT_COUNT = 4096
HALF_EXTENT = 0.95  # longest side maps to [-0.95, 0.95]

# Object types that Blender evaluates to a mesh (`Object.to_mesh` works on them).
CONVERTIBLE_TYPES = frozenset({"MESH", "CURVE", "SURFACE", "META", "FONT"})


class SamplingError(ValueError):
    """The object has nothing to sample (no faces, or all of zero area)."""


# Blender is z-up; the model was trained y-up (as glTF and OBJ files are, and as Blender's own OBJ export writes
# them): x → x, z → y, y → -z. A rotation (determinant +1), so triangle winding is kept.
BLENDER_TO_MODEL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class Normalization:
    """Blender world space ↔ the model's normalized frame: y-up, bbox centred, longest side 1.9.

    normalized = (R · world − centre) · scale and world = Rᵀ · (normalized / scale + centre), R = BLENDER_TO_MODEL;
    `centre` is in the model's (rotated) frame.
    """

    centre: tuple[float, float, float]
    scale: float

    @classmethod
    def fit(cls, points: np.ndarray) -> "Normalization":
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3) @ BLENDER_TO_MODEL.T
        if len(p) == 0:
            raise SamplingError("no points to normalize")
        lo, hi = p.min(axis=0), p.max(axis=0)
        extent = float((hi - lo).max())
        if not np.isfinite(extent) or extent <= 0.0:
            raise SamplingError("the object has zero size")
        return cls(tuple(float(c) for c in (lo + hi) / 2), 2.0 * HALF_EXTENT / extent)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) @ BLENDER_TO_MODEL.T - np.asarray(self.centre)) * self.scale

    @staticmethod
    def apply_to_normals(normals: np.ndarray) -> np.ndarray:
        return np.asarray(normals, dtype=np.float64) @ BLENDER_TO_MODEL.T

    def invert(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) / self.scale + np.asarray(self.centre)) @ BLENDER_TO_MODEL

    def matrix(self) -> np.ndarray:
        """The 4×4 matrix of `invert` (normalized → world)."""
        m = np.eye(4)
        m[:3, :3] = BLENDER_TO_MODEL.T / self.scale
        m[:3, 3] = BLENDER_TO_MODEL.T @ np.asarray(self.centre)
        return m


def triangle_areas_normals(tris: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 3, 3) triangles → areas (T,) and unit normals (T, 3) (zero for degenerate triangles)."""
    cross = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    length = np.linalg.norm(cross, axis=1)
    normals = np.divide(cross, length[:, None], out=np.zeros_like(cross), where=length[:, None] > 0)
    return length / 2, normals


def sample_surface(tris: np.ndarray, count: int = POINT_COUNT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform area-weighted samples of a triangle set: points (count, 3) and their faces' normals (count, 3)."""
    tris = np.asarray(tris, dtype=np.float64).reshape(-1, 3, 3)
    if len(tris) == 0:
        raise SamplingError("the mesh has no faces")
    areas, normals = triangle_areas_normals(tris)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0.0:
        raise SamplingError("the mesh's faces all have zero area")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(tris), size=count, p=areas / total)
    # Uniform barycentric coordinates: fold the unit square onto the triangle.
    u, v = rng.random(count), rng.random(count)
    outside = u + v > 1.0
    u[outside], v[outside] = 1.0 - u[outside], 1.0 - v[outside]
    t = tris[face]
    points = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    return points, normals[face]


def pack_points(points: np.ndarray, normals: np.ndarray) -> bytes:
    """(N, 3) + (N, 3) → little-endian float32 N×6 bytes, the protocol's point format."""
    data = np.concatenate([np.asarray(points), np.asarray(normals)], axis=1)
    return np.ascontiguousarray(data, dtype="<f4").tobytes()


def axes_frame(matrix_world) -> tuple[np.ndarray, np.ndarray]:
    """Split an object's world matrix W into F (local → its own axes: scale kept, rotation and location removed) and
    G (those axes → world: a rotation and the location), W = G · F, by polar decomposition of W's 3×3 part. A mirror
    stays in F (as a negative x scale), so G is always a proper rotation."""
    w = np.asarray(matrix_world, dtype=np.float64)
    mirror = np.diag([-1.0 if np.linalg.det(w[:3, :3]) < 0 else 1.0, 1.0, 1.0])
    u, _, vt = np.linalg.svd(w[:3, :3] @ mirror)
    rotation = u @ vt
    f, g = np.eye(4), np.eye(4)
    f[:3, :3] = rotation.T @ w[:3, :3]
    g[:3, :3], g[:3, 3] = rotation, w[:3, 3]
    return f, g


def object_triangles(obj, depsgraph, object_axes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Triangles (T, 3, 3) of the evaluated object (modifiers applied) in world space, or in the object's own axes
    (`axes_frame`), and the 4×4 matrix from that frame to world space."""
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        if mesh is None:  # an object with no mesh form: no triangles (callers say "no faces")
            return np.zeros((0, 3, 3)), np.eye(4)
        mesh.calc_loop_triangles()
        verts = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", verts)
        tri_index = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", tri_index)
    finally:
        evaluated.to_mesh_clear()
    matrix, frame_to_world = np.array(evaluated.matrix_world, dtype=np.float64), np.eye(4)
    if object_axes:
        matrix, frame_to_world = axes_frame(matrix)
    frame = verts.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
    return frame[tri_index.reshape(-1, 3)], frame_to_world


@dataclass
class PointCloud:
    """What one request sends: packed points, their count, and how to undo the normalization."""

    data: bytes
    count: int
    normalization: Normalization  # the sampled frame ↔ the model's normalized frame
    frame_to_world: np.ndarray  # 4×4: the sampled frame → Blender world space

    @property
    def to_world(self) -> np.ndarray:
        """4×4: the model's normalized frame → Blender world space."""
        return self.frame_to_world @ self.normalization.matrix()


def condition_from_triangles(tris: np.ndarray, count: int = POINT_COUNT, seed: int = 0,
                             frame_to_world: np.ndarray | None = None) -> PointCloud:
    """Sample triangles given in some frame (world space unless `frame_to_world` says otherwise)."""
    points, normals = sample_surface(tris, count, seed)
    norm = Normalization.fit(np.asarray(tris).reshape(-1, 3))
    frame_to_world = np.eye(4) if frame_to_world is None else np.asarray(frame_to_world, dtype=np.float64)
    return PointCloud(pack_points(norm.apply(points), norm.apply_to_normals(normals)), count, norm, frame_to_world)


def condition_from_object(obj, depsgraph, count: int = POINT_COUNT, seed: int = 0,
                          object_axes: bool = False) -> PointCloud:
    """Sample an object for a request; raises `SamplingError` with a readable reason when it has no surface.
    `object_axes`: read it in its own axes (`axes_frame`), so a rotated part reaches the model upright."""
    try:
        tris, frame_to_world = object_triangles(obj, depsgraph, object_axes)
        return condition_from_triangles(tris, count, seed, frame_to_world)
    except SamplingError as exc:
        raise SamplingError(f"'{obj.name}' cannot be retopologized: {exc}") from None

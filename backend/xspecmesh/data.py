"""Training data (DESIGN §6): seeded procedural low-poly meshes paired with the point clouds a user would give us.

A shape comes from one of `FAMILIES` (trimesh primitives and manifold3d solids, y up as in BPT's working order),
gets a random per-axis scale and rotation, is normalized to the token frame (bbox centre, longest side to
[-0.95, 0.95]) and is kept only if it survives 7-bit quantization intact: after `tokenizer.preprocess` it still has
every one of its faces (none collapsed or duplicated), at least `min_faces` and at most `max_faces`.

Its conditioning point cloud is sampled from a slightly, smoothly displaced copy of the same surface in the same
frame, so the tokens' dequantized vertices lie on the points up to quantization error.

Train/validation disjointness is guaranteed twice: the streams come from different `SeedSequence` spawn keys
(`TRAIN_STREAM`, `VALIDATION_STREAM`), and every quantized mesh is assigned to one split by a hash of its quantized
vertices and faces (`_split_of`) — training never yields a mesh whose hash belongs to validation, so not even an
identical token sequence (e.g. the same axis-aligned box drawn twice) can occur in both.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import manifold3d as mf
import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from xspecmesh import tokenizer
from xspecmesh.errors import MeshError, SettingsError
from xspecmesh.mesh import MESH_EXTENSIONS, load_mesh, normalize, sample_surface

UP_AXIS = 1  # BPT sorts vertices by y first: y is "up" in the token frame
TRAIN_STREAM, VALIDATION_STREAM = 0, 1  # SeedSequence spawn keys of the two splits
VALIDATION_SHARE = 8  # one quantized mesh in this many (by hash) belongs to validation only


@dataclass
class ShapeConfig:
    max_faces: int = 400  # cap on faces after quantization (BPT needs ~2.6 tokens per face)
    min_faces: int = 4
    families: tuple[str, ...] | None = None  # None: every family in FAMILIES, drawn uniformly
    anisotropy: float = 0.25  # per-axis scale factor drawn from exp(U(-a, a))
    tilt_prob: float = 0.2  # share of shapes given an arbitrary 3-D rotation; the rest stay upright (yaw only)
    max_tries: int = 500  # attempts within the drawn family before giving up (a config it cannot satisfy)
    strict: bool = True  # every face must survive quantization; False (user files): the quantized mesh is the target

    def __post_init__(self):
        if not 1 <= self.min_faces <= self.max_faces:
            raise SettingsError(f"need 1 <= min_faces <= max_faces, got {self.min_faces}, {self.max_faces}")
        unknown = set(self.families or ()) - set(FAMILIES)
        if unknown or (self.families is not None and not self.families):
            raise SettingsError(f"unknown or no shape families {sorted(unknown)}; known: {', '.join(FAMILIES)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.families) if self.families else tuple(FAMILIES)


@dataclass
class TrainingPair:
    tokens: np.ndarray  # int64 BPT tokens, no BOS/EOS
    points: np.ndarray  # (N, 6) float32 xyz + unit normal, token frame
    family: str


# ---------------------------------------------------------------- families: each returns a y-up trimesh, any size


def _tm(m: mf.Manifold) -> trimesh.Trimesh:
    mesh = m.to_mesh()
    return trimesh.Trimesh(np.asarray(mesh.vert_properties)[:, :3], np.asarray(mesh.tri_verts), process=False)


def _z_to_y(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """manifold3d extrudes and revolves along z; turn that axis to y (up)."""
    return trimesh.Trimesh(mesh.vertices[:, [0, 2, 1]] * [1, 1, -1], mesh.faces, process=False)  # a rotation


def _box(rng):
    ext = rng.uniform(0.2, 1.0, 3)
    if rng.random() < 0.6:
        return trimesh.creation.box(ext)
    c = rng.uniform(0.08, 0.3) * ext.min()  # chamfered box: hull of three boxes, each inset on two axes
    corners = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
    pts = np.concatenate([corners * (ext / 2 - c * (np.arange(3) != k)) for k in range(3)])
    return _tm(mf.Manifold.hull_points(pts))


def _prism(rng):
    n, r, h = int(rng.integers(3, 33)), rng.uniform(0.2, 1), rng.uniform(0.1, 1.5)
    if rng.random() < 0.5:  # caps as fans around a centre vertex
        return _z_to_y(trimesh.creation.cylinder(radius=r, height=h, sections=n))
    return _z_to_y(_tm(mf.Manifold.cylinder(h, r, r, n, True)))  # caps as n-gon triangulations


def _cone(rng):
    n, r, h = int(rng.integers(3, 33)), rng.uniform(0.2, 1), rng.uniform(0.2, 1.5)
    if rng.random() < 0.4:
        return _z_to_y(trimesh.creation.cone(radius=r, height=h, sections=n))
    top = 0.0 if rng.random() < 0.5 else r * rng.uniform(0.2, 0.8)  # pyramid or frustum
    return _z_to_y(_tm(mf.Manifold.cylinder(h, r, top, n, True)))


def _capsule(rng):
    count = [int(rng.integers(4, 17)), int(rng.integers(3, 9))]  # around, along (2 along is flat)
    return _z_to_y(trimesh.creation.capsule(height=rng.uniform(0.1, 2), radius=rng.uniform(0.2, 0.6), count=count))


def _icosphere(rng):
    if rng.random() < 0.7:
        return trimesh.creation.icosphere(subdivisions=int(rng.choice([0, 1, 1, 2])))
    return trimesh.creation.uv_sphere(count=[int(rng.integers(5, 17)), int(rng.integers(4, 11))])


def _torus(rng):
    return _z_to_y(trimesh.creation.torus(1.0, rng.uniform(0.15, 0.6), major_sections=int(rng.integers(5, 17)),
                                          minor_sections=int(rng.integers(3, 11))))


def _profile(rng) -> mf.CrossSection:
    """A random 2-D outline about the origin, size ~1: star, irregular polygon, letter of rectangles, ring."""
    kind = rng.integers(4)
    if kind == 0:
        n = int(rng.integers(4, 9))
        a = np.arange(2 * n) * math.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.35, 0.75))
    elif kind == 1:
        n = int(rng.integers(3, 13))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.5, 1.0, n)
    elif kind == 2:
        cs = mf.CrossSection()
        for _ in range(int(rng.integers(2, 4))):
            w, h = rng.uniform(0.2, 1.0, 2)
            cs = cs + mf.CrossSection.square((w, h), True).translate(tuple(rng.uniform(-0.4, 0.4, 2)))
        return cs
    else:
        r0 = rng.uniform(0.5, 1.0)
        n = int(rng.integers(4, 17))
        return mf.CrossSection.circle(r0, n) - mf.CrossSection.circle(r0 * rng.uniform(0.4, 0.85), n)
    return mf.CrossSection([np.stack([r * np.cos(a), r * np.sin(a)], 1)], mf.FillRule.NonZero)


def _extrusion(rng):
    top = (1.0, 1.0) if rng.random() < 0.7 else tuple([rng.uniform(0.4, 1.0)] * 2)  # sometimes tapered
    return _z_to_y(_tm(_profile(rng).extrude(rng.uniform(0.15, 1.5), 0, 0.0, top)))


def _lathe(rng):
    """Revolved profile: vase/column (touches the axis), cup (hollow), or ring (away from the axis)."""
    k = int(rng.integers(2, 7))
    ys = np.linspace(0, rng.uniform(0.5, 2.0), k)
    rs = rng.uniform(0.15, 1.0, k)
    kind = rng.integers(3)
    if kind == 0:
        pts = [(0, ys[0]), *zip(rs, ys), (0, ys[-1])]
    elif kind == 1:
        t = rng.uniform(0.04, 0.1)
        inner = [(max(r - t, 0.02), y) for r, y in zip(rs[::-1], ys[::-1]) if y > ys[0] + t]
        pts = [(0, ys[0]), *zip(rs, ys), *inner, (0, ys[0] + t)]
    else:
        off = rng.uniform(0.2, 0.8)
        pts = [*zip(rs * 0.4 + off, ys * 0.4), *zip(off - rs[::-1] * 0.1, ys[::-1] * 0.4)]
    pts = np.array(pts, dtype=float)
    return _z_to_y(_tm(mf.CrossSection([pts], mf.FillRule.NonZero).revolve(int(rng.integers(5, 21)))))


def _solid(rng) -> mf.Manifold:
    """A centred manifold primitive of size ~1 for cuts and booleans."""
    kind = rng.integers(4)
    n = int(rng.integers(4, 17))
    if kind == 0:
        return mf.Manifold.cube(tuple(rng.uniform(0.3, 1.0, 3)), True)
    if kind == 1:
        r = rng.uniform(0.2, 0.5)
        return mf.Manifold.cylinder(rng.uniform(0.3, 1.2), r, r * rng.choice([1, 1, 0.5, 0]), n, True)
    if kind == 2:
        return mf.Manifold.sphere(rng.uniform(0.3, 0.6), n)
    m = _lathe(rng)
    m.apply_translation(-m.bounds.mean(0))
    return mf.Manifold(mf.Mesh(m.vertices.astype(np.float32), m.faces.astype(np.uint32))).scale([0.6] * 3)


def _turned(m: mf.Manifold, rng) -> mf.Manifold:
    return m.rotate(tuple(rng.choice([0, 0, 90, rng.uniform(0, 360)], 3)))


def _plane_cut(rng):
    m = _solid(rng)
    for _ in range(int(rng.integers(1, 3))):
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        if rng.random() < 0.5:  # axis-aligned cuts are common in modelling
            n = np.eye(3)[rng.integers(3)] * rng.choice([-1, 1])
        lo, hi = m.bounding_box()[:3], m.bounding_box()[3:]
        c = np.asarray(lo) + np.asarray(hi)
        m = m.trim_by_plane(tuple(n), float(n @ c / 2 + rng.uniform(-0.3, 0.2) * np.ptp([lo, hi], 0) @ np.abs(n)))
    return _tm(m)


def _csg_union(rng):
    m = _solid(rng)
    for _ in range(int(rng.integers(1, 3))):
        m = m + _turned(_solid(rng), rng).translate(tuple(rng.uniform(-0.4, 0.4, 3)))
    return _tm(m)


def _csg_difference(rng):
    m = _solid(rng)
    for _ in range(int(rng.integers(1, 4))):
        cutter = _turned(_solid(rng).scale(tuple([rng.uniform(0.4, 0.8)] * 3)), rng)
        m = m - cutter.translate(tuple(rng.uniform(-0.4, 0.4, 3)))
    return _tm(m)


def _mirrored(rng):
    """An assembly with mirror symmetry: a slab with legs (mirrored over x and z) or with side parts (over x)."""
    b = np.array([rng.uniform(0.2, 0.6), rng.uniform(0.03, 0.3), rng.uniform(0.15, 0.5)])  # body half extents
    part = _turned(_solid(rng).scale((0.5, 0.5, 0.5)), rng)
    box = np.asarray(part.bounding_box())
    part, h = part.translate(tuple(-(box[:3] + box[3:]) / 2)), (box[3:] - box[:3]) / 2  # centred; half extents
    legs = rng.random() < 0.4
    if legs:  # hanging under the slab, overlapping it a little
        at = (rng.uniform(0.3, 0.9) * b[0], -b[1] - h[1] * rng.uniform(0.6, 1.0), rng.uniform(0.3, 0.9) * b[2])
    else:  # on the side, touching or sunk into it
        at = (b[0] + h[0] * rng.uniform(-0.6, 0.3), rng.uniform(-1, 1) * b[1], rng.uniform(-0.5, 0.5) * b[2])
    part = part.translate(at)
    parts = [part, part.mirror((1, 0, 0))]
    if legs:
        parts += [p.mirror((0, 0, 1)) for p in parts]
    body = mf.Manifold.cube(tuple(2 * b), True)
    if rng.random() < 0.5:  # one welded solid
        return _tm(mf.Manifold.batch_boolean([body, *parts], mf.OpType.Add))
    return trimesh.util.concatenate([_tm(p) for p in [body, *parts]])  # separate bodies, as artists often leave them


FAMILIES: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "box": _box, "prism": _prism, "cone": _cone, "capsule": _capsule, "icosphere": _icosphere, "torus": _torus,
    "extrusion": _extrusion, "lathe": _lathe, "plane_cut": _plane_cut, "csg_union": _csg_union,
    "csg_difference": _csg_difference, "mirrored": _mirrored,
}


SHAPE_PRESETS = {
    "tiny": ShapeConfig(max_faces=120),  # tests and smoke training
    "small": ShapeConfig(),  # the shipped model
}


# ---------------------------------------------------------------- shapes and pairs


def random_shape(rng: np.random.Generator, config: ShapeConfig | None = None) -> tuple[trimesh.Trimesh, str]:
    """A valid shape (see the module doc) in the token frame, and its family. Retries until one is found."""
    mesh, family, _ = _draw(rng, config or ShapeConfig())
    return mesh, family


def conditioning_points(mesh: trimesh.Trimesh, rng: np.random.Generator, count: int, *,
                        jitter: float = 0.0) -> np.ndarray:
    """(count, 6) float32 points + unit normals in the token frame, sampled from a slightly perturbed copy.

    The copy is the surface displaced along its normals by a smooth random field (a few sine waves, wavelengths
    0.8–3, amplitude up to 0.004, well under the 0.0156 quantization step), with normals tilted by the field's
    gradient: what a smooth high-poly version of the shape would give. Sampling a midpoint-subdivided copy would
    give the same points as sampling the mesh itself, so the density comes from `count`, not from subdivision.
    `jitter` adds isotropic Gaussian noise to the positions (scanner-like).
    """
    verts, _ = normalize(np.asarray(mesh.vertices, dtype=np.float64))
    sampled = sample_surface(trimesh.Trimesh(verts, np.asarray(mesh.faces), process=False), count,
                             seed=int(rng.integers(2**31))).astype(np.float64)
    p, n = sampled[:, :3], sampled[:, 3:]
    waves = rng.normal(size=(4, 3))
    waves *= rng.uniform(2.0, 8.0, (4, 1)) / np.linalg.norm(waves, axis=1, keepdims=True)  # wave vectors
    phase = p @ waves.T + rng.uniform(0, 2 * np.pi, 4)
    amplitude = rng.uniform(0, 0.002)
    height = amplitude * np.sin(phase).sum(1)
    grad = amplitude * np.cos(phase) @ waves
    tilted = n - (grad - np.sum(grad * n, axis=1, keepdims=True) * n)
    points = np.concatenate([p + height[:, None] * n, tilted / np.linalg.norm(tilted, axis=1, keepdims=True)], 1)
    if jitter > 0:
        points[:, :3] += rng.normal(0, jitter, (count, 3))
    return points.astype(np.float32)


def pair_from_mesh(mesh: trimesh.Trimesh, rng: np.random.Generator, num_points: int = 4096, family: str = "file",
                   augment: bool = False, config: ShapeConfig | None = None) -> TrainingPair | None:
    """Tokens and points of one mesh (augmented if asked, falling back to the plain pose); None if it is unusable."""
    config = config or ShapeConfig()
    base = trimesh.Trimesh(normalize(np.asarray(mesh.vertices, dtype=np.float64))[0], mesh.faces, process=False)
    candidates = [_augmented(base, rng) for _ in range(4)] if augment else []
    for candidate in [*candidates, base]:
        if _quantized_if_valid(candidate, config) is not None:
            return _pair(candidate, family, rng, num_points, augment)
    return None


def make_pair(rng: np.random.Generator, config: ShapeConfig | None = None, num_points: int = 4096,
              augment: bool = False, split: str = "train") -> TrainingPair:
    """A procedural training pair. Augmentation (yaw, per-axis scale 0.9–1.1, point jitter) is applied to the mesh
    before tokenizing, so tokens and points agree. `split` keeps the hash partition (module doc)."""
    config = config or ShapeConfig()
    want_validation = {"train": False, "validation": True}[split]
    while True:
        mesh, family, quantized = _draw(rng, config)
        if augment:
            aug = _augmented(mesh, rng)
            aug_quantized = _quantized_if_valid(aug, config)
            if aug_quantized is not None:
                mesh, quantized = aug, aug_quantized
        if _split_of(quantized) == want_validation:
            return _pair(mesh, family, rng, num_points, augment)


def iter_pairs(seed: int, config: ShapeConfig | None = None, num_points: int = 4096, augment: bool = True,
               worker: int = 0) -> Iterator[TrainingPair]:
    """Endless training pairs; `worker` gives data-loader workers independent streams of the same seed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(TRAIN_STREAM, worker)))
    while True:
        yield make_pair(rng, config, num_points, augment, split="train")


def validation_pairs(count: int = 100, seed: int = 12345, config: ShapeConfig | None = None,
                     num_points: int = 4096) -> list[TrainingPair]:
    """A fixed list, unaugmented; disjoint from every training stream by spawn key and by mesh hash."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(VALIDATION_STREAM,)))
    return [make_pair(rng, config, num_points, augment=False, split="validation") for _ in range(count)]


def load_mesh_dir(path: str | Path, config: ShapeConfig | None = None, num_points: int = 4096,
                  seed: int = 0) -> tuple[list[TrainingPair], list[str]]:
    """Pairs from a directory of mesh files (sorted, recursive), and one 'name: reason' line per skipped file.

    Without a config, files may have up to 4000 faces and may lose tiny faces to quantization (`strict=False`):
    the quantized mesh is then the target, as in BPT's own training.
    """
    root = Path(path)
    if not root.is_dir():
        raise MeshError(f"not a directory: {root}")
    config = config or ShapeConfig(max_faces=4000, strict=False)
    rng = np.random.default_rng(seed)
    pairs, skipped = [], []
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in MESH_EXTENSIONS):
        try:
            pair = pair_from_mesh(load_mesh(file), rng, num_points, f"file:{file.stem}", config=config)
        except MeshError as exc:
            skipped.append(f"{file.name}: {exc}")
            continue
        if pair is None:
            skipped.append(f"{file.name}: does not survive 7-bit quantization within {config.min_faces}.."
                           f"{config.max_faces} faces")
        else:
            pairs.append(pair)
    return pairs, skipped


# ---------------------------------------------------------------- helpers


def _draw(rng: np.random.Generator, config: ShapeConfig):
    """Family first (uniform), then retries within it, so rejection rates do not skew the family mix."""
    family = config.names[int(rng.integers(len(config.names)))]
    for _ in range(config.max_tries):
        mesh = _posed(FAMILIES[family](rng), rng, config)
        quantized = None if mesh is None else _quantized_if_valid(mesh, config)
        if quantized is not None:
            return mesh, family, quantized
    raise SettingsError(f"no valid {family!r} shape in {config.max_tries} tries: {config}")


def _pair(mesh: trimesh.Trimesh, family: str, rng: np.random.Generator, num_points: int,
          augment: bool) -> TrainingPair:
    tokens = np.asarray(tokenizer.encode(mesh.vertices, mesh.faces), dtype=np.int64)
    jitter = rng.uniform(0, 0.004) if augment else 0.0
    return TrainingPair(tokens, conditioning_points(mesh, rng, num_points, jitter=jitter), family)


def _posed(mesh: trimesh.Trimesh, rng: np.random.Generator, config: ShapeConfig) -> trimesh.Trimesh | None:
    """Random per-axis scale and rotation, then normalized to the token frame; None for an empty/flat result."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    if len(mesh.faces) == 0 or not np.isfinite(v).all() or np.ptp(v, axis=0).min() < 1e-6:
        return None
    v = v * np.exp(rng.uniform(-config.anisotropy, config.anisotropy, 3))
    if rng.random() < config.tilt_prob:
        rot = Rotation.from_quat(rng.normal(size=4))  # a normalized Gaussian quaternion: uniform over SO(3)
    else:
        yaw = rng.choice([0.0, 90.0, 180.0, 270.0]) if rng.random() < 0.5 else rng.uniform(0, 360)
        rot = Rotation.from_euler("xyz"[UP_AXIS], yaw, degrees=True)
    return trimesh.Trimesh(normalize(rot.apply(v))[0], np.asarray(mesh.faces), process=False)


def _augmented(mesh: trimesh.Trimesh, rng: np.random.Generator) -> trimesh.Trimesh:
    yaw = Rotation.from_euler("xyz"[UP_AXIS], rng.uniform(0, 360), degrees=True)
    v = yaw.apply(mesh.vertices) * rng.uniform(0.9, 1.1, 3)
    return trimesh.Trimesh(normalize(v)[0], mesh.faces, process=False)


def _quantized_if_valid(mesh: trimesh.Trimesh, config: ShapeConfig):
    """(qverts, qfaces) if every face survives quantization (preprocess drops collapsed and duplicated faces) and the
    count is within the config, else None."""
    n = len(mesh.faces)
    if config.strict and not config.min_faces <= n <= config.max_faces:
        return None
    qv, qf = tokenizer.preprocess(np.asarray(mesh.vertices), np.asarray(mesh.faces))
    if (config.strict and len(qf) != n) or not config.min_faces <= len(qf) <= config.max_faces:
        return None
    return qv, qf


def _split_of(quantized) -> bool:
    """True when this quantized mesh belongs to validation (a stable hash, not Python's salted `hash`)."""
    qv, qf = quantized
    data = np.ascontiguousarray(qv, dtype=np.int16).tobytes() + np.ascontiguousarray(qf, dtype=np.int32).tobytes()
    return zlib.crc32(data) % VALIDATION_SHARE == 0

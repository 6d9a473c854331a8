"""Training data: seeded procedural low-poly meshes paired with the point clouds a user would give us.

A shape comes from one of `shapes.FAMILIES` (trimesh primitives and manifold3d solids, y up as in BPT's order),
gets a random per-axis scale and rotation, is normalized to the token frame (bbox centre, longest side to
[-0.95, 0.95]) and is kept only if it survives 7-bit quantization intact: after `tokenizer.preprocess` it still has
every one of its faces (none collapsed, flattened, turned over or duplicated), at least `min_faces` and at most
`max_faces`.

Its conditioning point cloud is sampled from a slightly, smoothly displaced copy of the same surface in the same
frame, so the tokens' dequantized vertices lie on the points up to quantization error.

Train/validation disjointness is guaranteed twice: the streams come from different `SeedSequence` spawn keys
(`TRAIN_STREAM`, `VALIDATION_STREAM`), and every quantized mesh is assigned to one split by a hash of its quantized
vertices and faces (`_split_of`) — training never yields a mesh whose hash belongs to validation, so not even an
identical token sequence (e.g. the same axis-aligned box drawn twice) can occur in both.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from xspecmesh.geometry import tokenizer
from xspecmesh.errors import MeshError, SettingsError
from xspecmesh.geometry.mesh import MESH_EXTENSIONS, load_mesh, normalize, sample_surface
from xspecmesh.geometry.shapes import FAMILIES, FAMILY_GROUPS

UP_AXIS = 1  # BPT sorts vertices by y first: y is "up" in the token frame
TRAIN_STREAM, VALIDATION_STREAM = 0, 1  # SeedSequence spawn keys of the two splits
VALIDATION_SHARE = 8  # one quantized mesh in this many (by hash) belongs to validation only


@dataclass
class ShapeConfig:
    max_faces: int = 400  # cap on faces after quantization (BPT needs ~2.6 tokens per face)
    min_faces: int = 4
    families: tuple[str, ...] | None = None  # None: the general families (shapes.FAMILY_GROUPS), drawn uniformly
    anisotropy: float = 0.25  # per-axis scale factor drawn from exp(U(-a, a))
    tilt_prob: float = 0.2  # share of shapes given an arbitrary 3-D rotation; the rest stay upright (yaw only)
    # Parts modelled along the axes, as most hard-surface work in Blender is: upright, turned only by multiples of
    # 90 degrees, in training and in augmentation (a narrower task that a small model learns in CPU hours).
    axis_aligned: bool = False
    # With axis_aligned: 4 turns about the up axis only, or all 24 quarter-turn rotations (a part lying on its side)
    axis_turns: int = 4
    max_tries: int = 500  # attempts within the drawn family before giving up (a config it cannot satisfy)
    strict: bool = True  # every face must survive quantization; False (user files): the quantized mesh is the target

    def __post_init__(self):
        if not 1 <= self.min_faces <= self.max_faces:
            raise SettingsError(f"need 1 <= min_faces <= max_faces, got {self.min_faces}, {self.max_faces}")
        unknown = set(self.families or ()) - set(FAMILIES)
        if unknown or (self.families is not None and not self.families):
            raise SettingsError(f"unknown or no shape families {sorted(unknown)}; known: {', '.join(FAMILIES)} "
                                f"and the groups {', '.join(FAMILY_GROUPS)}")
        if self.axis_turns not in (4, 24) or (self.axis_turns == 24 and not self.axis_aligned):
            raise SettingsError(f"axis turns are 4 or 24, and 24 needs axis-aligned poses (--axis-aligned); got "
                                f"{self.axis_turns}{'' if self.axis_aligned else ' without'}")

    @classmethod
    def parse(cls, families: str | None, **options) -> "ShapeConfig":
        """From a comma-separated list of families and groups (`shapes.FAMILY_GROUPS`), as options and checkpoint
        metadata carry it (None or "": the general families)."""
        if not families:
            return cls(families=None, **options)
        names = [f.strip() for f in families.split(",")]
        expanded = [f for name in names for f in FAMILY_GROUPS.get(name, (name,))]
        return cls(families=tuple(dict.fromkeys(expanded)), **options)

    @classmethod
    def trained_on(cls, meta: dict, families: str | None = None, max_faces: int | None = None) -> "ShapeConfig":
        """The procedural distribution a checkpoint was trained on, from its metadata (its held-out shapes are what
        benchmarks and evaluations draw), or the families (comma-separated) and face cap given instead."""
        max_faces = int(max_faces or meta.get("max_faces") or cls.max_faces)
        return cls.parse(families or meta.get("families"), max_faces=max_faces,
                         axis_aligned=bool(meta.get("axis_aligned", False)), axis_turns=int(meta.get("axis_turns", 4)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.families) if self.families else FAMILY_GROUPS["general"]


@dataclass
class TrainingPair:
    tokens: np.ndarray  # int64 BPT tokens, no BOS/EOS
    points: np.ndarray  # (N, 6) float32 xyz + unit normal, token frame
    family: str
    ended: bool = True  # False: a sample cut at the token limit, whose next token is unknown (not EOS)


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
    candidates = [_augmented(base, rng, config) for _ in range(4)] if augment else []
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
            aug = _augmented(mesh, rng, config)
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
    if not config.axis_aligned and rng.random() < config.tilt_prob:
        rot = Rotation.from_quat(rng.normal(size=4))  # a normalized Gaussian quaternion: uniform over SO(3)
    else:
        # (axis-aligned shapes draw no coin here, so the default stream is the same as before the option existed)
        rot = _turn(rng, config) if config.axis_aligned else _yaw(rng, quarter_turns=rng.random() < 0.5)
    return trimesh.Trimesh(normalize(rot.apply(v))[0], np.asarray(mesh.faces), process=False)


def _yaw(rng: np.random.Generator, quarter_turns: bool) -> Rotation:
    """A turn about the up axis: by 0, 90, 180 or 270 degrees, or by any angle."""
    yaw = rng.choice([0.0, 90.0, 180.0, 270.0]) if quarter_turns else rng.uniform(0, 360)
    return Rotation.from_euler("xyz"[UP_AXIS], yaw, degrees=True)


_QUARTER_TURNS = Rotation.create_group("O")  # the 24 rotations that map the axes onto the axes


def _turn(rng: np.random.Generator, config: ShapeConfig) -> Rotation:
    """An axis-aligned pose: a quarter turn about the up axis, or any of the 24 (config.axis_turns)."""
    if config.axis_turns == 24:
        return _QUARTER_TURNS[int(rng.integers(24))]
    return _yaw(rng, quarter_turns=True)


def _augmented(mesh: trimesh.Trimesh, rng: np.random.Generator, config: ShapeConfig) -> trimesh.Trimesh:
    rot = _turn(rng, config) if config.axis_aligned else _yaw(rng, quarter_turns=False)
    v = rot.apply(mesh.vertices) * rng.uniform(0.9, 1.1, 3)
    return trimesh.Trimesh(normalize(v)[0], mesh.faces, process=False)


def _quantized_if_valid(mesh: trimesh.Trimesh, config: ShapeConfig):
    """(qverts, qfaces) if the count is within the config and, when strict, every face survives quantization intact
    (`preprocess` drops collapsed faces and keeps faces that quantization puts on the same three vertices; strict
    also refuses faces flattened to zero area or turned over), else None. Non-strict (user files): the quantized
    mesh, repeated faces included, is the target, as in BPT."""
    n = len(mesh.faces)
    if config.strict and not config.min_faces <= n <= config.max_faces:
        return None
    qv, qf = tokenizer.preprocess(np.asarray(mesh.vertices), np.asarray(mesh.faces))
    if config.strict and (len(qf) != n or len(np.unique(np.sort(qf, axis=1), axis=0)) != n):
        return None
    if not config.min_faces <= len(qf) <= config.max_faces:
        return None
    if config.strict:
        # nor flattened (three grid points in a line: exact, integer cross products), nor turned over: a face
        # flipped by rounding runs an edge the same way as its neighbour does (preprocess keeps each winding)
        tri = qv[qf]
        edges = qf[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
        if not np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).any(axis=1).all() or \
                len(np.unique(edges, axis=0)) < len(edges):
            return None
    return qv, qf


def _split_of(quantized) -> bool:
    """True when this quantized mesh belongs to validation (a stable hash, not Python's salted `hash`)."""
    qv, qf = quantized
    data = np.ascontiguousarray(qv, dtype=np.int16).tobytes() + np.ascontiguousarray(qf, dtype=np.int32).tobytes()
    return zlib.crc32(data) % VALIDATION_SHARE == 0

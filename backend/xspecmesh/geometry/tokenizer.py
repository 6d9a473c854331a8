"""BPT tokenizer: 7-bit quantization, block/offset indexing (8 blocks x 16 offsets per axis), patch aggregation.

Checkpoint-compatible with the published BPT model: `encode` reproduces the reference token sequences in
tests/data/reference/bpt_tokens token for token (see docs/ARCHITECTURE.md). Vocabulary:

    0..511      block     (qx//16)*64 + (qy//16)*8 + qz//16
    512..4607   offset    512 + (qx%16)*256 + (qy%16)*16 + qz%16
    4608..5119  special   block + 4608, the centre of a new patch (every patch but the first)
    5120        EOS

A patch is a triangle fan: centre c, rim r0, r1, ... decodes to (c, r0, r1), (c, r1, r2), ...
Inside a patch a vertex whose block equals the current block emits only its offset. Quirk of the reference we keep:
the vertex right after a special block always re-emits its plain block, even when it lies in the same block.
"""
from __future__ import annotations

import numpy as np

from xspecmesh.geometry.faces import first_of_repeats, proper

NUM_LEVELS = 128  # 7-bit quantization per axis
BLOCK_SIZE = 8  # blocks per axis
OFFSET_SIZE = 16  # offsets per axis inside a block (8 * 16 = 128)
NUM_BLOCKS = BLOCK_SIZE**3  # 512
OFFSET_BASE = NUM_BLOCKS  # 512
SPECIAL_BASE = OFFSET_BASE + OFFSET_SIZE**3  # 4608
EOS = SPECIAL_BASE + NUM_BLOCKS  # 5120
VOCAB_SIZE = EOS + 1  # 5121


def is_block(t):
    return (t >= 0) & (t < OFFSET_BASE)


def is_offset(t):
    return (t >= OFFSET_BASE) & (t < SPECIAL_BASE)


def is_special(t):
    return (t >= SPECIAL_BASE) & (t < EOS)


PLAIN, OFFSET, SPECIAL, END = range(4)  # token classes: plain block, offset, special (patch-start) block, EOS


def token_classes(vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    """The class of every token id (ids past the vocabulary's blocks and offsets count as END)."""
    ids = np.arange(vocab_size)
    return np.select([ids < OFFSET_BASE, ids < SPECIAL_BASE, ids < EOS], [PLAIN, OFFSET, SPECIAL], END)


def quantize(x) -> np.ndarray:
    """Coordinates in [-1, 1] to integer levels 0..127 (round half to even, as the reference)."""
    t = (np.asarray(x, dtype=np.float64) + 1.0) / 2.0 * NUM_LEVELS - 0.5
    return np.clip(np.round(t), 0, NUM_LEVELS - 1).astype(np.int64)


def dequantize(q) -> np.ndarray:
    """Integer levels to bin centres in [-1, 1]."""
    return (np.asarray(q, dtype=np.float64) + 0.5) / NUM_LEVELS * 2.0 - 1.0


def block_offset(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) integer levels -> block ids (0..511) and offset tokens (512..4607)."""
    b, o = q // OFFSET_SIZE, q % OFFSET_SIZE
    block = (b[:, 0] * BLOCK_SIZE + b[:, 1]) * BLOCK_SIZE + b[:, 2]
    offset = OFFSET_BASE + (o[:, 0] * OFFSET_SIZE + o[:, 1]) * OFFSET_SIZE + o[:, 2]
    return block, offset


def block_axes(block) -> np.ndarray:
    """Block ids (0..511) -> (N, 3) block indices per axis (0..7)."""
    b = np.asarray(block, np.int64)
    return np.stack([b // BLOCK_SIZE**2, b // BLOCK_SIZE % BLOCK_SIZE, b % BLOCK_SIZE], axis=-1)


def offset_axes(offset) -> np.ndarray:
    """Offset tokens (512..4607) -> (N, 3) offsets per axis inside the block (0..15)."""
    o = np.asarray(offset, np.int64) - OFFSET_BASE
    return np.stack([o // OFFSET_SIZE**2, o // OFFSET_SIZE % OFFSET_SIZE, o % OFFSET_SIZE], axis=-1)


def vertex_levels(block, offset) -> np.ndarray:
    """Inverse of block_offset: block ids and offset tokens -> (N, 3) integer levels."""
    return block_axes(block) * OFFSET_SIZE + offset_axes(offset)


def current_blocks(t: np.ndarray) -> np.ndarray:
    """For every position of a valid token sequence (no EOS), the block its offset belongs to: the last block or
    special (patch-start) token at or before it, 0 before any."""
    sets = is_special(t) | is_block(t)
    last = np.maximum.accumulate(np.where(sets, np.arange(len(t)), -1)) if len(t) else np.zeros(0, np.int64)
    return np.where(last >= 0, t[np.maximum(last, 0)] % SPECIAL_BASE, 0)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    """Raw triangle mesh -> (quantized vertices (V, 3) int64, faces (F, 3) int64) in BPT's canonical order."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)[:, [2, 0, 1]]  # working frame (z, x, y)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(v) == 0 or len(f) == 0:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)
    v = v - 0.5 * (v.min(0) + v.max(0))
    # The reference divides by (extent + 1e-6); the epsilon decides ties such as 101.5 -> 101 (capsule.obj).
    v = 2.0 * 0.95 * v / ((v.max(0) - v.min(0)).max() + 1e-6)
    q = quantize(v)
    key, inverse = np.unique((q[:, 0] * NUM_LEVELS + q[:, 1]) * NUM_LEVELS + q[:, 2], return_inverse=True)
    q = np.stack([key // NUM_LEVELS**2, key // NUM_LEVELS % NUM_LEVELS, key % NUM_LEVELS], axis=1)
    f = inverse.reshape(-1)[f]  # duplicate vertices merged
    # Block-first vertex order: coarse 4x4x4 cells (32 levels wide), then lexicographic by z', y', x'.
    coarse = ((q[:, 2] // 32) * 4 + q[:, 1] // 32) * 4 + q[:, 0] // 32
    order = np.lexsort((q[:, 0], q[:, 1], q[:, 2], coarse))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    q, f = q[order], rank[f]
    # A triangle with a repeated index has no cycle of length 3: drop it. Rotate lowest index first, winding kept.
    f = f[proper(f)]
    f = np.take_along_axis(f, (np.argmin(f, axis=1)[:, None] + np.arange(3)) % 3, axis=1)
    # Stable sort by the sorted index tuple. Faces on the same three vertices (a thin wall or coincident surfaces
    # that quantization collapses) all stay, as in the published pipeline; the detokenizer drops the repeats.
    key = np.sort(f, axis=1)
    f = f[np.lexsort((key[:, 2], key[:, 1], key[:, 0]))]
    used = np.zeros(len(q), bool)
    used[f.reshape(-1)] = True
    q, f = q[used], (np.cumsum(used) - 1)[f]
    return q[:, [1, 2, 0]], f  # axes back to (x, y, z)


# ---------------------------------------------------------------------------------------------------------------
# Serialization


def _patches(faces: np.ndarray, num_vertices: int) -> list[list[int]]:
    """Patchified aggregation: a list of [centre, rim0, rim1, ...] vertex-index lists covering every face once."""
    faces_l = faces.tolist()
    num_faces = len(faces_l)
    degree = np.bincount(faces.reshape(-1), minlength=num_vertices).tolist()
    incident: list[list[int]] = [[] for _ in range(num_vertices)]
    for fi, (a, b, c) in enumerate(faces_l):
        incident[a].append(fi)
        incident[b].append(fi)
        incident[c].append(fi)
    # The winding a rim is checked against: for faces on the same three vertices the reference's orientation table
    # keeps the last one's winding (later faces overwrite earlier entries).
    winding = {tuple(sorted(face)): face for face in faces_l}
    visited = [False] * num_faces
    first = 0  # lowest face index that may still be unvisited
    patches = []
    while True:
        while first < num_faces and visited[first]:
            first += 1
        if first == num_faces:
            return patches
        face = faces_l[first]
        centre = max(face, key=lambda i: degree[i])  # ties: first in the face
        pairs = []
        for fi in incident[centre]:
            if not visited[fi]:
                a, b, c = faces_l[fi]
                u, w = (b, c) if a == centre else (a, c) if b == centre else (a, b)
                pairs.append((u, w, fi) if u < w else (w, u, fi))
        pairs.sort()
        count: dict[int, int] = {}
        for u, w, _ in pairs:
            count[u] = count.get(u, 0) + 1
            count[w] = count.get(w, 0) + 1
        ends = [i for i, n in count.items() if n == 1]
        rim = [min(ends) if ends else pairs[0][0]]
        used: list[int] = []
        while len(rim) <= len(pairs):  # walk the chain, always taking the first (sorted) unused pair
            cur = rim[-1]
            for u, w, fi in pairs:
                if (u == cur or w == cur) and fi not in used:
                    rim.append(w if u == cur else u)
                    used.append(fi)
                    break
            else:
                break
        a, b, c = winding[tuple(sorted((centre, rim[0], rim[1])))]
        if (centre, rim[0], rim[1]) not in ((a, b, c), (b, c, a), (c, a, b)):
            rim.reverse()
        degree[centre] = len(pairs) - len(used)
        degree[rim[0]] -= 1
        degree[rim[-1]] -= 1
        for i in rim[1:-1]:
            degree[i] -= 2
        for fi in used:
            visited[fi] = True
        patches.append([centre] + rim)


def serialize(qverts, faces) -> list[int]:
    """Preprocessed mesh (quantized vertices, faces) -> BPT tokens (no BOS, no EOS).

    Expects `preprocess` output: no degenerate faces. Repeated faces (same three vertices, either winding) are
    serialized once each, as the reference does.
    """
    qverts = np.asarray(qverts, dtype=np.int64).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return []
    patches = _patches(faces, len(qverts))
    seq = np.fromiter((i for p in patches for i in p), dtype=np.int64)
    is_centre = np.zeros(len(seq), bool)
    is_centre[np.cumsum([0] + [len(p) for p in patches[:-1]])] = True
    block, offset = block_offset(qverts[seq])
    # A block token is emitted when the block changes, for every patch centre, and (the quirk) for the vertex
    # right after a centre. The first patch is unmarked; later centres emit the special block.
    emit = np.ones(len(seq), bool)
    emit[1:] = (block[1:] != block[:-1]) | is_centre[1:] | is_centre[:-1]
    emit[1] = block[1] != block[0]  # the first centre is unmarked, so no quirk after it
    block_tok = np.where(is_centre, block + SPECIAL_BASE, block)
    block_tok[0] = block[0]
    out = np.stack([np.where(emit, block_tok, -1), offset], axis=1).reshape(-1)
    return out[out >= 0].tolist()


def encode(vertices, faces) -> list[int]:
    """Raw mesh -> BPT tokens (no BOS, no EOS)."""
    return serialize(*preprocess(vertices, faces))


# ---------------------------------------------------------------------------------------------------------------
# Detokenization


def _dedupe(tris: np.ndarray) -> np.ndarray:
    """Drop degenerate triangles and repeated ones (same three vertices in any order); first kept, order kept."""
    flat = tris.reshape(-1, 3)
    key = ((flat[:, 0] * NUM_LEVELS + flat[:, 1]) * NUM_LEVELS + flat[:, 2]).reshape(-1, 3)  # one id per vertex
    keep = proper(key)
    return tris[keep][first_of_repeats(key[keep])]


def decode(tokens) -> np.ndarray:
    """Tokens -> (T, 3, 3) int64 quantized triangles, in fan order (stops at EOS, ignores invalid ids)."""
    t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64).reshape(-1)
    stop = np.nonzero(t == EOS)[0]
    t = t[: stop[0]] if len(stop) else t
    t = t[(t >= 0) & (t < EOS)]
    special = is_special(t)
    patch = np.cumsum(special)
    off = is_offset(t)
    verts, vpatch = vertex_levels(current_blocks(t)[off], t[off]), patch[off]
    if len(verts) < 3:
        return np.zeros((0, 3, 3), np.int64)
    start = np.r_[True, vpatch[1:] != vpatch[:-1]]
    head = np.maximum.accumulate(np.where(start, np.arange(len(verts)), 0))  # first vertex of each patch
    rank = np.arange(len(verts)) - head
    j = np.nonzero(rank >= 2)[0]
    tris = np.stack([verts[head[j]], verts[j - 1], verts[j]], axis=1)
    return _dedupe(tris)


def decode_mesh(tokens) -> tuple[np.ndarray, np.ndarray]:
    """Tokens -> welded mesh: (vertices (V, 3) float64 bin centres, faces (F, 3) int64)."""
    tris = decode(tokens)
    if len(tris) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    q, inverse = np.unique(tris.reshape(-1, 3), axis=0, return_inverse=True)
    return dequantize(q), inverse.reshape(-1, 3).astype(np.int64)


class IncrementalDetokenizer:
    """Streaming decode: push one token at a time, get the triangles it completes (same result as `decode`)."""

    def __init__(self) -> None:
        self.finished = False
        self.num_triangles = 0
        self._block = 0
        self._patch: list[tuple[int, int, int]] = []
        self._seen: set[tuple] = set()

    def push(self, token: int) -> np.ndarray:
        none = np.zeros((0, 3, 3), np.int64)
        token = int(token)
        if self.finished or token < 0 or token > EOS:
            return none
        if token == EOS:
            self.finished = True
        elif token >= SPECIAL_BASE:
            self._block, self._patch = token - SPECIAL_BASE, []
        elif token < OFFSET_BASE:
            self._block = token
        else:
            b, o = self._block, token - OFFSET_BASE
            vertex = (b // 64 * 16 + o // 256, b // 8 % 8 * 16 + o // 16 % 16, b % 8 * 16 + o % 16)
            self._patch.append(vertex)
            if len(self._patch) >= 3:
                tri = (self._patch[0], self._patch[-2], self._patch[-1])
                key = tuple(sorted(tri))
                if len(set(tri)) == 3 and key not in self._seen:
                    self._seen.add(key)
                    self.num_triangles += 1
                    return np.array([tri], dtype=np.int64)
        return none

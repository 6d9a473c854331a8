"""BPT tokenizer: exact agreement with the reference tokenizer's outputs, and round-trip properties."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xspecmesh.geometry import tokenizer as T
from xspecmesh.geometry.mesh import load_mesh

REF = Path(__file__).parent / "data" / "reference"
NAMES = sorted(p.stem for p in (REF / "bpt_tokens").glob("*.json"))


def reference(name: str) -> tuple[dict, trimesh.Trimesh]:
    data = json.loads((REF / "bpt_tokens" / f"{name}.json").read_text())
    return data, load_mesh(REF / "meshes" / data["source_obj"], process=False)


def test_reference_set_is_complete():
    assert len(NAMES) == 13


@pytest.mark.parametrize("name", NAMES)
def test_reference_mesh(name):
    data, mesh = reference(name)
    qverts, faces = T.preprocess(mesh.vertices, mesh.faces)
    assert qverts.dtype == np.int64 and faces.dtype == np.int64
    np.testing.assert_array_equal(qverts, data["processed_vertices_quantized"])
    np.testing.assert_array_equal(faces, data["processed_faces"])
    assert T.serialize(qverts, faces) == data["tokens"]
    assert T.encode(mesh.vertices, mesh.faces) == data["tokens"]
    decoded = T.decode(data["tokens"])
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, data["decoded_triangles_quantized"])  # order included


@pytest.mark.parametrize("name", NAMES)
def test_incremental_matches_batch(name):
    data, _ = reference(name)
    detok = T.IncrementalDetokenizer()
    parts = [detok.push(t) for t in data["tokens"]]
    assert all(p.shape[1:] == (3, 3) and len(p) <= 1 for p in parts)
    streamed = np.concatenate(parts)
    assert {t.tobytes() for t in streamed} == {t.tobytes() for t in T.decode(data["tokens"])}
    np.testing.assert_array_equal(streamed, T.decode(data["tokens"]))  # same order, too
    assert detok.num_triangles == len(streamed) and not detok.finished
    assert len(detok.push(T.EOS)) == 0 and detok.finished
    assert len(detok.push(data["tokens"][2])) == 0 and len(detok.push(T.SPECIAL_BASE)) == 0


def test_reference_shows_the_reemitted_block_quirk():
    # Right after a special block the next vertex re-emits its plain block even when it is the same block.
    hits = 0
    for name in NAMES:
        t = reference(name)[0]["tokens"]
        hits += sum(T.is_special(t[i]) and t[i + 2] == t[i] - T.SPECIAL_BASE for i in range(len(t) - 2))
    assert hits > 0


def test_vocabulary_and_helpers():
    assert (T.NUM_BLOCKS, T.OFFSET_BASE, T.SPECIAL_BASE, T.EOS, T.VOCAB_SIZE) == (512, 512, 4608, 5120, 5121)
    assert T.is_block(0) and T.is_block(511) and not T.is_block(512)
    assert T.is_offset(512) and T.is_offset(4607) and not T.is_offset(4608)
    assert T.is_special(4608) and T.is_special(5119) and not T.is_special(T.EOS)
    t = np.arange(T.VOCAB_SIZE)
    assert T.is_block(t).sum() == 512 and T.is_offset(t).sum() == 4096 and T.is_special(t).sum() == 512
    q = np.arange(128)
    np.testing.assert_array_equal(T.quantize(T.dequantize(q)), q)
    np.testing.assert_array_equal(T.quantize([-1.0, -0.95, 0.0, 0.95, 1.0, 3.0]), [0, 3, 64, 124, 127, 127])
    grid = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 3)
    block, offset = T.block_offset(grid)
    assert block.min() == 0 and block.max() == 511 and offset.min() == 512 and offset.max() == 4607
    assert len(np.unique(block * 4096 + offset)) == 128**3


def test_decode_is_defensive():
    tokens = reference("box")[0]["tokens"]
    full = T.decode(tokens)
    np.testing.assert_array_equal(T.decode(tokens + [T.EOS] + tokens[:9]), full)
    np.testing.assert_array_equal(T.decode([-1, 99999] + tokens), full)
    assert T.decode([]).shape == (0, 3, 3) and T.decode([T.EOS]).shape == (0, 3, 3)
    again = [tokens[0] + T.SPECIAL_BASE] + tokens[1:]  # the same patches once more
    np.testing.assert_array_equal(T.decode(tokens + again), full)  # repeated faces dropped
    vertices, faces = T.decode_mesh(tokens)
    assert vertices.shape == (8, 3) and faces.shape == (12, 3) and np.abs(vertices).max() < 1
    np.testing.assert_array_equal(T.quantize(vertices)[faces], full)
    rng = np.random.default_rng(0)
    junk = rng.integers(0, T.VOCAB_SIZE, 3000).tolist()
    detok = T.IncrementalDetokenizer()
    streamed = [detok.push(t) for t in junk + [-5, 10**6]]
    batch = T.decode(junk)
    assert {t.tobytes() for t in np.concatenate(streamed)} == {t.tobytes() for t in batch}
    assert all(len(set(map(tuple, tri))) == 3 for tri in batch)


def test_icosphere_compression():
    sphere = trimesh.creation.icosphere(2)
    assert len(T.encode(sphere.vertices, sphere.faces)) == 894  # 320 faces: 31% of 9 per face
    assert T.encode(np.zeros((0, 3)), np.zeros((0, 3), int)) == []


# ---------------------------------------------------------------------------------------------------------------
# Repeated faces: the published pipeline keeps faces on the same three vertices and serializes each; the
# detokenizer merges vertices and drops the repeats.


def offsets(qverts) -> list[int]:
    return T.block_offset(np.asarray(qverts))[1].tolist()


@pytest.mark.parametrize("second", [[0, 1, 2], [0, 2, 1]], ids=["same-winding", "opposite-winding"])
def test_coincident_faces_are_kept_and_serialized(second):
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    qverts, faces = T.preprocess(vertices, [[0, 1, 2], second])
    assert len(faces) == 2 and sorted(faces[0]) == sorted(faces[1])
    assert (faces[0] == faces[1]).all() == (second == [0, 1, 2])  # winding kept
    tokens = T.serialize(qverts, faces)
    # One fan around vertex 0 whose rim runs 1 -> 2 -> 1 (both faces of the pair), as the reference walks it.
    fan = qverts[[0, 1, 2, 1]] if tuple(faces[0]) == (0, 1, 2) else qverts[[0, 2, 1, 2]]
    block = T.block_offset(fan)[0]
    expected = [int(block[0])]
    for i, (b, o) in enumerate(zip(block, offsets(fan))):
        if i and b != block[i - 1]:
            expected.append(int(b))
        expected.append(o)
    assert tokens == expected
    assert len(T.decode(tokens)) == 1  # the repeat is dropped again
    detok = T.IncrementalDetokenizer()
    assert len(np.concatenate([detok.push(t) for t in tokens])) == 1


def test_rim_winding_follows_the_last_of_repeated_faces():
    # Centre 0 with a closed fan of four faces, two of them on {0, 1, 2} with opposite windings. The rim walk gives
    # 1, 2, 1, 3, 2; the reference checks (0, 1, 2) against its orientation table, where the later face (0, 2, 1)
    # overwrote the earlier one, so the rim is reversed.
    qverts = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    faces = np.array([[0, 1, 2], [0, 2, 1], [0, 2, 3], [0, 3, 1]])
    assert T.serialize(qverts, faces) == [0] + offsets(qverts[[0, 2, 3, 1, 2, 1]])
    np.testing.assert_array_equal(T.decode(T.serialize(qverts, faces)), qverts[[[0, 2, 3], [0, 3, 1], [0, 1, 2]]])


def thin_wall_model() -> trimesh.Trimesh:
    """A unit cube with a plate inside, 0.002 thick: 7-bit quantization collapses the plate's top and bottom onto
    the same four vertices (opposite windings) and its sides to nothing."""
    corners = np.array([[-0.4, -0.4], [0.4, -0.4], [0.4, 0.4], [-0.4, 0.4]])
    top, bottom = np.c_[corners, np.full(4, 0.301)], np.c_[corners, np.full(4, 0.299)]  # vertices 0-3, 4-7
    faces = [[0, 1, 2], [0, 2, 3], [4, 6, 5], [4, 7, 6]]  # top up, bottom down, on the same diagonal
    faces += [f for i in range(4) for f in ([i, i + 4, (i + 1) % 4 + 4], [i, (i + 1) % 4 + 4, (i + 1) % 4])]
    plate = trimesh.Trimesh(np.vstack([top, bottom]), faces, process=False)
    return trimesh.util.concatenate([trimesh.creation.box((1, 1, 1)), plate])


def test_thin_wall_keeps_both_sides():
    mesh = thin_wall_model()
    qverts, faces = T.preprocess(mesh.vertices, mesh.faces)
    assert len(qverts) == 12 and len(faces) == 12 + 4  # the plate's 2 x 2 faces on 4 vertices, sides dropped
    keys = np.sort(faces, axis=1)
    assert len(np.unique(keys, axis=0)) == 14
    tokens = T.encode(mesh.vertices, mesh.faces)
    decoded = T.decode(tokens)
    assert len(decoded) == 14 and len(canonical(decoded)) == 14
    detok = T.IncrementalDetokenizer()
    np.testing.assert_array_equal(np.concatenate([detok.push(t) for t in tokens]), decoded)
    vertices, tris = T.decode_mesh(tokens)
    assert vertices.shape == (12, 3) and tris.shape == (14, 3)


# ---------------------------------------------------------------------------------------------------------------
# Round trip on random consistently oriented meshes: decode(encode(m)) == the quantized, merged, deduplicated m.


def canonical(tris) -> set:
    """Triangles as vertex-tuple triples rotated so the smallest vertex comes first (winding kept)."""
    out = set()
    for tri in np.asarray(tris).tolist():
        k = tri.index(min(tri))
        out.add(tuple(map(tuple, tri[k:] + tri[:k])))
    return out


def expected_triangles(vertices, faces) -> set:
    v = np.asarray(vertices, float)
    v = v - (v.min(0) + v.max(0)) / 2
    q = T.quantize(1.9 * v / ((v.max(0) - v.min(0)).max() + 1e-6))
    tris, seen = [], set()
    for tri in q[np.asarray(faces)].tolist():
        key = tuple(sorted(map(tuple, tri)))
        if len(set(key)) == 3 and key not in seen:
            seen.add(key)
            tris.append(tri)
    return canonical(tris)


@st.composite
def oriented_meshes(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # height field with boundary, holes and bow-ties from dropped faces
        nx, ny = draw(st.integers(2, 6)), draw(st.integers(2, 6))
        x, y = np.meshgrid(np.linspace(0, 1, nx), np.linspace(0, 1, ny), indexing="ij")
        vertices = np.stack([x, y, rng.random(x.shape) * draw(st.floats(0, 1))], -1).reshape(-1, 3)
        i = np.arange(nx - 1)[:, None] * ny + np.arange(ny - 1)[None]
        i = i.reshape(-1)
        faces = np.concatenate([np.stack([i, i + ny, i + 1], 1), np.stack([i + 1, i + ny, i + ny + 1], 1)])
    else:  # closed sphere, radially jittered and rotated
        sphere = trimesh.creation.icosphere(draw(st.integers(0, 1)))
        vertices = sphere.vertices * (1 + 0.2 * rng.random((len(sphere.vertices), 1)))
        vertices = vertices @ trimesh.transformations.random_rotation_matrix(rng.random(3))[:3, :3].T
        faces = np.asarray(sphere.faces)
    keep = rng.random(len(faces)) < draw(st.floats(0.3, 1.0))
    keep[rng.integers(len(faces))] = True
    faces = faces[keep]
    perm = rng.permutation(len(vertices))  # shuffle vertex ids, face order and face rotation
    faces = np.argsort(perm)[faces][rng.permutation(len(faces))]
    faces = np.take_along_axis(faces, (rng.integers(0, 3, (len(faces), 1)) + np.arange(3)) % 3, 1)
    return vertices[perm] * draw(st.floats(0.1, 100)), faces


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(oriented_meshes())
def test_round_trip(mesh):
    vertices, faces = mesh
    tokens = T.encode(vertices, faces)
    decoded = T.decode(tokens)
    assert len(decoded) == len(canonical(decoded))
    assert canonical(decoded) == expected_triangles(vertices, faces)
    assert all(T.is_block(t) or T.is_offset(t) or T.is_special(t) for t in tokens)
    detok = T.IncrementalDetokenizer()
    streamed = [detok.push(t) for t in tokens]
    assert canonical(np.concatenate(streamed)) == canonical(decoded)

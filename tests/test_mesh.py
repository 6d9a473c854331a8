"""Mesh I/O and geometry helpers: clear errors, normalization, seeded area-weighted sampling, welding, round trips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from xspecmesh.errors import MeshError
from xspecmesh.geometry.faces import first_of_repeats, proper
from xspecmesh.geometry.mesh import load_mesh, load_points, normalize, sample_surface, weld, save_mesh

REF = Path(__file__).parent / "data" / "reference" / "meshes"


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("missing.obj", None, "no such file"),
        ("mesh.txt", "v 0 0 0\n", "unsupported mesh format"),
        ("broken.glb", "not a glb at all", "cannot read mesh"),
        ("points.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no faces"),
        ("nan.obj", "v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n", "NaN or infinite"),
        ("inf.obj", "v 0 0 0\nv inf 0 0\nv 0 1 0\nf 1 2 3\n", "NaN or infinite"),
        ("point.obj", "v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n", "zero extent"),
        ("index.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
         "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n",
         "do not exist"),
    ],
)
def test_load_mesh_errors(tmp_path, name, content, pattern):
    path = tmp_path / name if content is None else write_text(tmp_path / name, content)
    with pytest.raises(MeshError, match=pattern) as info:
        load_mesh(path)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_load_raw_and_processed(tmp_path):
    raw = load_mesh(REF / "icosphere1.obj", process=False)
    assert raw.vertices.shape == (42, 3) and raw.faces.shape == (80, 3)
    box = trimesh.creation.box()
    soup = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(36).reshape(12, 3), process=False)
    path = tmp_path / "soup.obj"
    save_mesh(path, soup.vertices, np.vstack([soup.faces, [[0, 0, 1]]]))
    assert len(load_mesh(path, process=False).faces) == 13
    processed = load_mesh(path)
    assert len(processed.vertices) == 8 and len(processed.faces) == 12


def test_scene_parts_are_concatenated(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box())
    scene.add_geometry(trimesh.creation.icosphere(1), transform=trimesh.transformations.translation_matrix([3, 0, 0]))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path)
    assert len(mesh.faces) == 12 + 80 and mesh.bounds[1, 0] > 3.5


@pytest.mark.parametrize("ext", [".obj", ".ply", ".stl", ".off", ".glb"])
def test_write_load_round_trip(tmp_path, ext):
    sphere = trimesh.creation.icosphere(1)
    path = tmp_path / f"sphere{ext}"
    save_mesh(path, sphere.vertices, sphere.faces)
    back = load_mesh(path)
    assert len(back.faces) == 80 and len(back.vertices) == 42
    key = lambda m: np.sort(np.round(m.vertices[m.faces], 5).reshape(len(m.faces), -1), axis=0)  # noqa: E731
    np.testing.assert_allclose(key(back), key(sphere), atol=1e-5)
    with pytest.raises(MeshError, match="unsupported"):
        save_mesh(tmp_path / "sphere.xyz", sphere.vertices, sphere.faces)


def test_normalization_round_trip():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(100, 3)) * [3.0, 1.0, 0.5] + [10.0, -4.0, 2.0]
    normed, norm = normalize(points)
    lo, hi = normed.min(0), normed.max(0)
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-12)
    assert np.isclose((hi - lo).max(), 1.9) and np.isclose(hi[0], 0.95)
    np.testing.assert_allclose(norm.invert(normed), points, atol=1e-12)
    np.testing.assert_allclose(norm.apply(points), normed)
    with pytest.raises(MeshError, match="zero extent"):
        normalize(np.ones((4, 3)))


def test_sampling_is_seeded_area_weighted_with_unit_normals():
    # Two disjoint triangles with areas 0.5 and 4.5: about 10% of the samples land on the small one.
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 5], [0, 3, 5], [3, 0, 5]], float)
    mesh = trimesh.Trimesh(vertices, [[0, 1, 2], [3, 4, 5]], process=False)
    samples = sample_surface(mesh, 20000, seed=3)
    assert samples.shape == (20000, 6) and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, sample_surface(mesh, 20000, seed=3))
    assert not np.array_equal(samples, sample_surface(mesh, 20000, seed=4))
    small = samples[:, 2] < 1
    assert abs(small.mean() - 0.1) < 0.01
    np.testing.assert_allclose(np.linalg.norm(samples[:, 3:], axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(samples[small, 3:], [[0, 0, 1]] * small.sum(), atol=1e-6)
    np.testing.assert_allclose(samples[~small, 3:], [[0, 0, -1]] * (~small).sum(), atol=1e-6)
    assert (samples[small, 0] + samples[small, 1] <= 1 + 1e-6).all() and (samples[:, :2] >= -1e-6).all()
    box = trimesh.creation.box(extents=[2, 2, 2])
    on_box = sample_surface(box, 1000, seed=0)
    np.testing.assert_allclose(np.abs(on_box[:, :3]).max(1), 1, atol=1e-6)


def test_weld():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1e-9, 0], [0, 1, 1e-9], [1, 1, 0], [5, 5, 5]])
    faces = np.array([[0, 1, 2], [3, 5, 4], [2, 1, 0], [0, 3, 1], [1, 4, 5]])
    v, f = weld(vertices, faces, tol=1e-6)
    assert v.shape == (4, 3) and f.tolist() == [[0, 1, 2], [1, 3, 2]]  # duplicate, degenerate, unused dropped
    np.testing.assert_array_equal(v, vertices[[0, 1, 2, 5]])
    v, f = weld(vertices, faces, tol=1e-12)
    assert len(v) == 6 and len(f) == 4


def test_face_checks():
    faces = np.array([[0, 1, 2], [2, 1, 0], [0, 0, 1], [1, 2, 0], [3, 4, 5], [5, 4, 4]])
    assert proper(faces).tolist() == [True, True, False, True, True, False]
    assert first_of_repeats(faces).tolist() == [0, 2, 4, 5]  # [2, 1, 0] and [1, 2, 0] repeat [0, 1, 2]
    assert first_of_repeats(np.zeros((0, 3), int)).tolist() == []


def test_load_points(tmp_path):
    good = np.random.default_rng(0).normal(size=(50, 6))
    np.save(tmp_path / "good.npy", good)
    points = load_points(tmp_path / "good.npy")
    assert points.dtype == np.float32 and points.shape == (50, 6)
    np.save(tmp_path / "shape.npy", good[:, :3])
    bad = good.copy()
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    cases = {"shape.npy": "(N, 6)", "nan.npy": "NaN", "junk.npy": "cannot read", "none.npy": "no such file"}
    for name, pattern in cases.items():
        with pytest.raises(MeshError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
            load_points(tmp_path / name)
    with pytest.raises(MeshError, match=r"\.npy"):
        load_points(REF / "box.obj")

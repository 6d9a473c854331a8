"""Bpy-free add-on geometry: triangle buffers and welding, surface sampling and normalization (no Blender needed)."""
from __future__ import annotations


import numpy as np
import pytest
from addon_modules import addon_module





buffers = addon_module("core.buffers")
sampling = addon_module("core.sampling")


def cube_triangles(size: float = 2.0, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A closed box as 12 outward-facing triangles, shape (12, 3, 3)."""
    h = size / 2
    v = np.array([(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)]) + np.asarray(centre)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
    return v[np.array(faces)]


# ------------------------------------------------------------------------------------------------ buffers


def test_buffer_grows_in_order_and_tracks_what_was_shown():
    buf = buffers.TriangleBuffer(capacity=2)
    tris = cube_triangles()
    assert len(buf) == 0 and not buf.dirty
    for chunk in (tris[:1], tris[1:5], [], tris[5:]):
        buf.extend(chunk)
    assert len(buf) == 12 and buf.dirty
    np.testing.assert_allclose(buf.triangles, tris.astype(np.float32))
    buf.mark_shown()
    assert not buf.dirty
    buf.extend(tris[:1].tolist())  # JSON lists from the protocol
    assert buf.dirty and len(buf) == 13
    with pytest.raises(ValueError):
        buf.triangles[0, 0, 0] = 1.0  # the view is read-only


def test_buffer_drops_non_finite_triangles():
    buf = buffers.TriangleBuffer()
    bad = cube_triangles()[:3].copy()
    bad[1, 2, 0] = np.nan
    assert buf.extend(bad) == 2 and len(buf) == 2


def test_buffer_replace_takes_a_matching_fitted_mesh_only():
    buf = buffers.TriangleBuffer(capacity=2)
    tris = cube_triangles()
    buf.extend(tris)
    buf.mark_shown()
    assert not buf.replace(tris[:5] * 1.1)  # wrong count: nothing changes
    wrong = tris * 1.1
    wrong[0, 0, 0] = np.inf
    assert not buf.replace(wrong) and not buf.dirty
    np.testing.assert_allclose(buf.triangles, tris)
    assert buf.replace((tris * 1.1).tolist()) and buf.dirty and len(buf) == 12
    np.testing.assert_allclose(buf.triangles, tris * 1.1, rtol=1e-6)


def test_soup_gives_every_face_its_own_vertices():
    verts, faces = buffers.soup(cube_triangles())
    assert verts.shape == (36, 3) and faces.shape == (12, 3)
    np.testing.assert_array_equal(faces.ravel(), np.arange(36))


def test_weld_merges_vertices_and_keeps_winding():
    tris = cube_triangles()
    verts, faces = buffers.weld(tris + np.random.default_rng(0).normal(0, 1e-7, tris.shape))
    assert verts.shape == (8, 3) and faces.shape == (12, 3)
    np.testing.assert_allclose(verts[faces], tris, atol=1e-5)  # same triangles, same vertex order
    # closed and consistently wound: every directed edge appears once, its reverse once
    edges = {(int(a), int(b)) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    assert len(edges) == 36 and all((b, a) in edges for a, b in edges)


def test_weld_drops_degenerate_duplicate_and_unreferenced():
    tris = cube_triangles()
    collapsed = tris[0].copy()
    collapsed[1] = collapsed[0]  # two corners on one point
    flipped = tris[3][::-1]  # same three vertices as face 3, other winding: a duplicate
    verts, faces = buffers.weld(np.concatenate([tris[:4], [collapsed, flipped, tris[0]]]))
    assert len(faces) == 4
    assert len(np.unique(faces)) == len(verts)  # no unreferenced vertices
    np.testing.assert_allclose(verts[faces], tris[:4], atol=1e-6)


def test_weld_of_nothing():
    verts, faces = buffers.weld(np.zeros((0, 3, 3)))
    assert verts.shape == (0, 3) and faces.shape == (0, 3)


def test_transform_applies_an_affine_matrix():
    m = np.eye(4)
    m[:3, :3] = [[0, -2, 0], [2, 0, 0], [0, 0, 2]]  # rotate 90° about z, scale 2
    m[:3, 3] = [1, 2, 3]
    out = buffers.transform(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), m)
    np.testing.assert_allclose(out, [[1, 4, 3], [1, 2, 5]])


# ------------------------------------------------------------------------------------------------ sampling


def test_normalization_maps_longest_side_to_095_and_back():
    pts = np.random.default_rng(1).uniform([-1, 0, 10], [3, 1, 11], size=(500, 3))
    norm = sampling.Normalization.fit(pts)
    n = norm.apply(pts)
    lo, hi = n.min(axis=0), n.max(axis=0)
    np.testing.assert_allclose(hi[0], 0.95) and np.testing.assert_allclose(lo[0], -0.95)
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-12)  # bbox centred
    np.testing.assert_allclose(norm.invert(n), pts)
    m = norm.matrix()
    np.testing.assert_allclose(n @ m[:3, :3].T + m[:3, 3], pts)


def test_normalization_turns_blender_z_up_into_the_models_y_up():
    tall = np.array([[0, 0, 0], [0.2, 0.1, 4.0]])  # tall along Blender's z
    norm = sampling.Normalization.fit(tall)
    n = norm.apply(tall)
    np.testing.assert_allclose(n[:, 1], [-0.95, 0.95])  # … is tall along the model's y
    np.testing.assert_allclose(norm.apply_to_normals([[0, 0, 1], [0, 1, 0]]), [[0, 1, 0], [0, 0, -1]])
    assert np.isclose(np.linalg.det(sampling.BLENDER_TO_MODEL), 1.0)  # a rotation: winding survives


def test_normalization_refuses_a_point():
    with pytest.raises(sampling.SamplingError):
        sampling.Normalization.fit(np.ones((4, 3)))


def test_samples_lie_on_the_surface_with_face_normals():
    tris = cube_triangles(size=2.0, centre=(5, 0, 0))
    pts, normals = sampling.sample_surface(tris, 4000, seed=3)
    assert pts.shape == (4000, 3) and normals.shape == (4000, 3)
    local = pts - [5, 0, 0]
    assert np.all(np.abs(local) <= 1 + 1e-9)
    assert np.allclose(np.abs(local).max(axis=1), 1.0)  # on a face of the box
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0)
    # each normal is the outward axis of the face its point lies on
    axis = np.abs(local).argmax(axis=1)
    np.testing.assert_allclose(normals[np.arange(4000), axis], np.sign(local[np.arange(4000), axis]))


def test_sampling_is_area_weighted_and_seeded():
    big = cube_triangles()[:2] * [1, 3, 1]  # the x = -1 side stretched to 6×2 (area 12) …
    small = cube_triangles()[:2] + [0, 0, 10]  # … and a 2×2 copy far above it (area 4)
    pts, _ = sampling.sample_surface(np.concatenate([big, small]), 20000, seed=0)
    share = (pts[:, 2] > 5).mean()
    assert abs(share - 4 / 16) < 0.01
    again, _ = sampling.sample_surface(np.concatenate([big, small]), 20000, seed=0)
    np.testing.assert_array_equal(pts, again)


def test_sampling_errors_are_readable():
    with pytest.raises(sampling.SamplingError, match="no faces"):
        sampling.sample_surface(np.zeros((0, 3, 3)))
    with pytest.raises(sampling.SamplingError, match="zero area"):
        sampling.sample_surface(np.zeros((3, 3, 3)))


def test_condition_packs_normalized_float32_points():
    tris = cube_triangles(size=4.0, centre=(1, 2, 3))
    cloud = sampling.condition_from_triangles(tris, count=1024, seed=0)
    data = np.frombuffer(cloud.data, dtype="<f4").reshape(1024, 6)
    assert cloud.count == 1024
    np.testing.assert_allclose(np.abs(data[:, :3]).max(axis=1), 0.95, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(data[:, 3:], axis=1), 1.0, rtol=1e-5)
    # normals point away from the centre in the normalized frame too (rotated along with the points)
    assert (np.sum(data[:, :3] * data[:, 3:], axis=1) > 0).all()
    np.testing.assert_allclose(cloud.normalization.invert(data[:, :3]).mean(axis=0), [1, 2, 3], atol=0.1)


class _FakeMesh:
    """The slice of bpy.types.Mesh that `object_triangles` reads."""

    def __init__(self, verts, tris):
        self.vertices = _Seq(np.asarray(verts, np.float32), "co")
        self.loop_triangles = _Seq(np.asarray(tris, np.int32), "vertices")

    def calc_loop_triangles(self):
        pass


class _Seq:
    def __init__(self, data, attr):
        self.data, self.attr = data, attr

    def __len__(self):
        return len(self.data)

    def foreach_get(self, attr, out):
        assert attr == self.attr
        out[:] = self.data.ravel()


class _FakeObject:
    def __init__(self, mesh, matrix):
        self.mesh, self.matrix_world, self.name, self.cleared = mesh, matrix, "Fake", False

    def evaluated_get(self, depsgraph):
        return self

    def to_mesh(self):
        return self.mesh

    def to_mesh_clear(self):
        self.cleared = True


def test_world_triangles_reads_the_evaluated_mesh_in_world_space():
    m = np.eye(4)
    m[:3, 3] = [10, 0, 0]
    m[0, 0] = 2
    obj = _FakeObject(_FakeMesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]]), m.tolist())
    tris, _ = sampling.object_triangles(obj, depsgraph=None)
    np.testing.assert_allclose(tris, [[[10, 0, 0], [12, 0, 0], [10, 1, 0]]])
    assert obj.cleared  # the temporary mesh is always freed
    empty = _FakeObject(_FakeMesh(np.zeros((0, 3)), np.zeros((0, 3))), np.eye(4).tolist())
    with pytest.raises(sampling.SamplingError, match="'Fake' cannot be retopologized: the mesh has no faces"):
        sampling.condition_from_object(empty, depsgraph=None)
    no_mesh = _FakeObject(None, np.eye(4).tolist())  # to_mesh() gives None for objects with no mesh form
    with pytest.raises(sampling.SamplingError, match="'Fake' cannot be retopologized: the mesh has no faces"):
        sampling.condition_from_object(no_mesh, depsgraph=None)


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _world(rotation, scale, location) -> np.ndarray:
    w = np.eye(4)
    w[:3, :3], w[:3, 3] = rotation @ np.diag(scale), location
    return w


@pytest.mark.parametrize("scale", [(2.0, 1.0, 0.5), (-2.0, 1.0, 0.5)])  # plain and mirrored
def test_axes_frame_splits_off_rotation_and_location_keeping_scale(scale):
    w = _world(_rotation_z(30), scale, (4, -1, 2))
    f, g = sampling.axes_frame(w)
    np.testing.assert_allclose(g @ f, w, atol=1e-12)
    np.testing.assert_allclose(f, np.diag([*scale, 1.0]), atol=1e-12)  # the object's axes, its scale kept
    np.testing.assert_allclose(g[:3, :3], _rotation_z(30), atol=1e-12)  # a proper rotation, even when mirrored
    np.testing.assert_allclose(g[:3, 3], (4, -1, 2))


def test_object_axes_send_a_rotated_part_upright_and_bring_the_result_back():
    tris = cube_triangles(size=1.0)
    verts, faces = tris.reshape(-1, 3), np.arange(36).reshape(12, 3)
    w = _world(_rotation_z(30), (2.0, 1.0, 0.5), (4, -1, 2))
    obj = _FakeObject(_FakeMesh(verts, faces), w.tolist())

    def normals(cloud):
        return np.frombuffer(cloud.data, dtype="<f4").reshape(-1, 6)[:, 3:]

    upright = sampling.condition_from_object(obj, depsgraph=None, count=512, object_axes=True)
    world = sampling.condition_from_object(obj, depsgraph=None, count=512)
    assert np.allclose(np.abs(normals(upright)).max(axis=1), 1.0, atol=1e-6)  # every face along an axis
    assert not np.allclose(np.abs(normals(world)).max(axis=1), 1.0, atol=1e-3)  # turned by 30 degrees
    for cloud in (upright, world):  # either way, to_world takes the model's frame onto the object's surface
        pts = np.frombuffer(cloud.data, dtype="<f4").reshape(-1, 6)[:, :3].astype(np.float64)
        back = np.c_[pts, np.ones(len(pts))] @ cloud.to_world.T @ np.linalg.inv(w).T
        np.testing.assert_allclose(np.abs(back[:, :3]).max(axis=1), 0.5, atol=1e-5)

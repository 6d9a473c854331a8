"""xspecmesh.geometry.fit: moving a generated mesh's vertices onto the input surface, connectivity unchanged."""
from __future__ import annotations

import numpy as np
import trimesh

from xspecmesh.geometry import mesh as M
from xspecmesh.geometry.fit import FitConfig, fit_to_points, fit_triangles


def box_points(extents, count=2048, seed=0):
    return M.sample_surface(trimesh.creation.box(extents), count, seed=seed)


def test_a_box_with_wrong_extents_is_fitted_to_the_true_box():
    target = np.array([1.9, 0.6, 1.2])
    wrong = trimesh.creation.box([1.9, 0.75, 1.45])  # what a model a few grid levels off would give
    wrong.vertices += [0.03, -0.02, 0.0]
    fitted = fit_to_points(wrong.vertices, wrong.faces, box_points(target))
    assert np.abs(np.ptp(fitted, axis=0) - target).max() < 0.02
    assert np.abs(fitted.mean(0)).max() < 0.01
    assert np.abs(np.ptp(wrong.vertices, axis=0) - target).max() > 0.2  # the test starts far off


def test_soup_order_shape_and_connectivity_kept_and_distance_falls():
    box = trimesh.creation.box([1.9, 0.6, 1.2])
    box.vertices *= [1.0, 1.2, 1.15]
    soup = box.vertices[box.faces].astype(np.float32)
    soup = np.concatenate([soup, soup[:1, [0, 0, 1]]])  # a degenerate triangle (repeated corner) rides along
    out, stats = fit_triangles(soup, box_points([1.9, 0.6, 1.2]))
    assert out.shape == soup.shape and out.dtype == np.float32
    _, before = np.unique(soup.reshape(-1, 3), axis=0, return_inverse=True)
    _, after = np.unique(out.reshape(-1, 3), axis=0, return_inverse=True)
    pairs = set(zip(before.ravel(), after.ravel()))
    assert len(pairs) == len(set(before.ravel())) == len(set(after.ravel()))  # same corners coincide, no others
    assert stats["fit_distance_after"] < 0.5 * stats["fit_distance_before"]


def test_unused_vertices_stay_far_moves_are_clamped_and_empty_input_is_returned():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5.0]])
    faces = np.array([[0, 1, 2]])
    pts = M.sample_surface(trimesh.Trimesh(verts[:3] + [0, 0, 0.05], faces), 500)
    out = fit_to_points(verts, faces, pts)
    assert np.array_equal(out[3], verts[3])  # used by no face
    assert np.abs(out[:3, 2] - 0.05).max() < 0.01  # the triangle moved onto the points' plane
    far = fit_to_points(verts, faces, pts + np.array([0, 0, 3.0, 0, 0, 0], np.float32), FitConfig(max_move=0.25))
    np.testing.assert_allclose(np.linalg.norm(far[:3] - verts[:3], axis=1), 0.25)  # clamped at max_move
    assert (far[:3, 2] > 0.2).all() and np.array_equal(far[3], verts[3])
    long_normals = fit_to_points(verts, faces, np.concatenate([pts[:, :3], pts[:, 3:] * 7.0], 1))
    np.testing.assert_allclose(long_normals, out, atol=1e-9)  # normals of any length count the same
    empty, stats = fit_triangles(np.zeros((0, 3, 3)), pts)
    assert empty.shape == (0, 3, 3) and stats["fit_seconds"] == 0.0

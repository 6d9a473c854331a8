"""Metrics: Chamfer/Hausdorff, the BPT protocol evaluation, failure rows, topology counts."""
import math

import numpy as np
import pytest
import trimesh

from xspecmesh.errors import MeshError
from xspecmesh.geometry.metrics import (GEOMETRY_KEYS, bbox_mesh, chamfer_hausdorff, closed, distance_to_points,
                                       evaluate, topology)


@pytest.fixture(scope="module")
def sphere():
    return trimesh.creation.icosphere(subdivisions=3)


def test_chamfer_hausdorff_known_values():
    assert chamfer_hausdorff(np.zeros((1, 3)), np.array([[1.0, 0, 0]])) == (2.0, 1.0)
    cd, hd = chamfer_hausdorff(np.array([[0.0, 0, 0], [1, 0, 0]]), np.zeros((1, 3)))
    assert cd == pytest.approx(0.5) and hd == pytest.approx(1.0)
    # Extra columns (normals) are ignored.
    cd, _ = chamfer_hausdorff(np.ones((4, 6)), np.ones((3, 6)))
    assert cd == 0.0


def test_mesh_against_itself_is_at_the_sampling_floor(sphere):
    m = evaluate(sphere, sphere.copy(), seed=0)
    assert m["failed"] is False and set(GEOMETRY_KEYS) <= set(m)
    # The floor grows with surface area (mean NN distance ~ 0.5 sqrt(area / samples)): a sphere of radius 0.95 sits
    # at CD 0.105 (1024) and 0.034 (10k); F-score at tau 0.02 is only ~0.66 even for a perfect copy at 10k.
    assert 0.08 < m["cd"] < 0.13
    assert m["cd_10k"] < 0.04 and m["cd_10k"] < m["cd"] / 2.5
    assert m["hd"] < 0.2 and m["hd_10k"] < m["hd"]
    assert m["normal_consistency"] > 0.99 and m["fscore"] > 0.55
    assert evaluate(sphere, sphere, seed=0) == m  # fixed seeds: reproducible


def test_scale_and_position_do_not_matter(sphere):
    moved = sphere.copy()
    moved.apply_scale(7.0)
    moved.apply_translation([3, -2, 10])
    assert evaluate(moved, sphere)["cd_10k"] == pytest.approx(evaluate(sphere, sphere)["cd_10k"], abs=1e-6)


def test_deformed_or_coarser_copies_score_worse(sphere):
    same = evaluate(sphere, sphere)
    dented = sphere.copy()
    v = dented.vertices.copy()
    v[v[:, 0] > 0.3, 0] -= 0.3  # push a cap inwards
    dented.vertices = v
    coarse = trimesh.creation.icosphere(subdivisions=0)
    for worse in (evaluate(dented, sphere), evaluate(coarse, sphere), evaluate(bbox_mesh(sphere), sphere)):
        assert worse["cd_10k"] > same["cd_10k"] + 0.005
        assert worse["hd_10k"] > same["hd_10k"]
        assert worse["fscore"] < same["fscore"]
    assert evaluate(bbox_mesh(sphere), sphere)["normal_consistency"] < same["normal_consistency"] - 0.1


@pytest.mark.parametrize("pred", [None, trimesh.Trimesh(), trimesh.Trimesh([[0, 0, 0], [1, 1, 1], [2, 2, 2]],
                                                                            [[0, 1, 2]], process=False)])
def test_failed_generations_are_flagged_not_dropped(sphere, pred):
    m = evaluate(pred, sphere)
    assert m["failed"] is True
    assert all(math.isnan(m[k]) for k in GEOMETRY_KEYS)


def test_empty_reference_is_an_error(sphere):
    with pytest.raises(MeshError):
        evaluate(sphere, trimesh.Trimesh())


def test_topology_of_clean_meshes(sphere):
    box = trimesh.creation.box()
    assert topology(box) == {"faces": 12, "vertices": 8, "non_manifold_edges": 0, "boundary_edges": 0,
                             "degenerate_faces": 0, "duplicate_faces": 0, "bodies": 1}
    two = trimesh.util.concatenate([box, sphere.copy().apply_translation([5, 0, 0])])
    assert topology(two)["bodies"] == 2 and topology(two)["faces"] == 12 + len(sphere.faces)
    # A triangle soup (as read from STL) is welded before counting.
    soup = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(36).reshape(12, 3), process=False)
    assert topology(soup) == topology(box)


def test_topology_of_broken_meshes():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, -1, 0], [2, 0, 0]], float)
    fin = topology(trimesh.Trimesh(v, [[0, 1, 2], [0, 1, 3], [0, 1, 4]], process=False))
    assert fin["non_manifold_edges"] == 1 and fin["boundary_edges"] == 6 and fin["bodies"] == 1
    single = topology(trimesh.Trimesh(v, [[0, 1, 2]], process=False))
    assert single["boundary_edges"] == 3 and single["vertices"] == 3
    odd = topology(trimesh.Trimesh(v, [[0, 1, 2], [2, 1, 0], [0, 0, 1], [1, 2, 5], [3, 4, 4]], process=False))
    assert odd["duplicate_faces"] == 1 and odd["degenerate_faces"] == 2
    flat = topology(trimesh.Trimesh(v, [[0, 1, 6]], process=False))  # collinear: zero area
    assert flat["degenerate_faces"] == 1
    assert topology(trimesh.Trimesh())["faces"] == 0


def test_bbox_mesh(sphere):
    ellipsoid = sphere.copy()
    ellipsoid.apply_scale([1, 2, 0.5])
    ellipsoid.apply_translation([1, 1, 1])
    box = bbox_mesh(ellipsoid)
    assert np.allclose(box.bounds, ellipsoid.bounds)
    assert len(box.faces) == 12 and box.is_watertight and box.volume > 0


def test_closed_welds_a_triangle_soup_and_needs_every_edge_twice():
    box = trimesh.creation.box()
    assert closed(box.vertices[box.faces])
    assert not closed(box.vertices[box.faces[1:]])  # one face missing: a hole
    assert not closed(np.zeros((0, 3, 3)))


def test_distance_to_points_prefers_the_surface_the_points_came_from(sphere):
    from xspecmesh.geometry.mesh import sample_surface

    points = sample_surface(sphere, 4000, seed=1)
    box = bbox_mesh(sphere)
    near, far = (distance_to_points(m.vertices[m.faces], points) for m in (sphere, box))
    assert 2 * near < far  # (near is the sampling floor, ~0.07 for a unit sphere at 2048 samples)
    assert distance_to_points(np.zeros((0, 3, 3)), points) == math.inf

"""Procedural shape families: each draws one random low-poly solid, y up as in BPT's working order, at any
size and position (data.py poses, normalizes and validates it). trimesh primitives for the simple ones, manifold3d
for extrusions, lathes and booleans.
"""
from __future__ import annotations

import math
from typing import Callable

import manifold3d as mf
import numpy as np
import trimesh


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

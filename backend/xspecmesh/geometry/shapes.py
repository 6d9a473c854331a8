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


# ---------------------------------------------------------------- hard-surface parts
# What CAD users and kitbashers retopologize: few sides (3-12), flat faces, right angles, holes and unions. Sizes are
# drawn so that no feature is thinner than ~6% of the part's longest side, so that (with the per-axis scale of the
# pose) every face survives 7-bit quantization (128 levels across the frame) in most draws; data.py rejects the rest.


def _sides(rng, low: int = 3) -> int:
    return int(rng.integers(low, 13))


def _extruded(outline: mf.CrossSection, depth: float) -> mf.Manifold:
    """A 2-D outline in the x-y plane extruded along z, centred on the origin."""
    return outline.extrude(depth).translate((0, 0, -depth / 2))


def _ngon_prism(rng):
    n, r = _sides(rng), rng.uniform(0.25, 0.6)
    return _z_to_y(_tm(mf.Manifold.cylinder(rng.uniform(0.2, 1.2), r, r, n, True)))


def _wedge(rng):
    """A ramp: right-triangle or trapezoid profile (a sloped top), extruded."""
    w, h = rng.uniform(0.4, 1.0), rng.uniform(0.25, 0.8)
    lip = 0.0 if rng.random() < 0.5 else h * rng.uniform(0.15, 0.5)  # trapezoid: the low end keeps some height
    pts = [(0, 0), (w, 0), (w, h)] + ([(0, lip)] if lip else [])
    return _tm(_extruded(mf.CrossSection([np.array(pts)]), rng.uniform(0.3, 1.0)))


def _pyramid_cone(rng):
    """Pyramids (3-6 sides), cones (7-12) and their frustums, tip up."""
    n, r = _sides(rng), rng.uniform(0.25, 0.6)
    top = 0.0 if rng.random() < 0.6 else r * rng.uniform(0.25, 0.7)
    return _z_to_y(_tm(mf.Manifold.cylinder(rng.uniform(0.25, 1.0), r, top, n, True)))


def _chamfered_block(rng):
    """A box with every edge chamfered (hull of three boxes, each inset on two axes) or only the four edges along
    one axis (hull of two boxes, each inset on one of the other axes)."""
    ext = rng.uniform(0.35, 1.0, 3)
    c = rng.uniform(0.12, 0.3) * ext.min()
    corners = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
    along = int(rng.integers(3))
    insets = [np.arange(3) != k for k in range(3)] if rng.random() < 0.5 else \
        [np.arange(3) == j for j in range(3) if j != along]
    return _tm(mf.Manifold.hull_points(np.concatenate([corners * (ext / 2 - c * inset) for inset in insets])))


def _section(rng):
    """L, T or U section (a structural profile) extruded: flanges and web 12-30% of the smaller side thick."""
    w, h = rng.uniform(0.5, 1.0, 2)
    t = rng.uniform(0.12, 0.3) * min(w, h)
    kind = rng.choice(["L", "T", "U"])
    bar = lambda x0, y0, x1, y1: mf.CrossSection.square((x1 - x0, y1 - y0)).translate((x0, y0))
    if kind == "L":
        cs = bar(0, 0, w, t) + bar(0, 0, t, h)
    elif kind == "T":
        cs = bar(0, h - t, w, h) + bar((w - t) / 2, 0, (w + t) / 2, h)
    else:
        cs = bar(0, 0, w, t) + bar(0, 0, t, h) + bar(w - t, 0, w, h)
    return _tm(_extruded(cs, rng.uniform(0.3, 1.2)))


def _tube(rng):
    """An n-gon ring (3-12 sides outside; the same or a rounder hole) extruded: pipes, bushings, square tubes."""
    n, r = _sides(rng), rng.uniform(0.3, 0.6)
    inner = n if rng.random() < 0.6 else _sides(rng, 6)
    hole = r * math.cos(math.pi / n) * rng.uniform(0.5, 0.8)  # inside the outline's inscribed circle: one ring
    ring = mf.CrossSection.circle(r, n) - mf.CrossSection.circle(hole, inner)
    return _tm(_extruded(ring, rng.uniform(0.15, 1.2)))


def _stepped_block(rng):
    """Two or three boxes stacked, each smaller than the one below and flush with one of its sides or centred."""
    ext, centre, y, parts = rng.uniform(0.5, 1.0, 3) * [1, 0.3, 1], np.zeros(2), 0.0, []
    for _ in range(int(rng.integers(2, 4))):
        parts.append(mf.Manifold.cube(tuple(ext), True).translate((centre[0], y + ext[1] / 2, centre[1])))
        new = ext * [rng.uniform(0.45, 0.8), rng.uniform(0.6, 1.3), rng.uniform(0.45, 0.8)]
        centre = centre + rng.choice([-0.5, 0, 0.5], 2) * (ext - new)[[0, 2]]  # +-0.5: flush with that side
        y, ext = y + ext[1] - 0.01, new  # sunk in a little: boxes that only touch would stay separate bodies
    return _tm(mf.Manifold.batch_boolean(parts, mf.OpType.Add))


def _cross(rng):
    """A plus-shaped profile extruded, or three crossing bars (a 3-D cross / jack)."""
    t = rng.uniform(0.15, 0.35, 3)
    arms = rng.uniform(0.6, 1.2, 3)
    if rng.random() < 0.6:
        plus = (mf.CrossSection.square((arms[0], t[0]), True) + mf.CrossSection.square((t[1], arms[1]), True))
        return _tm(_extruded(plus, t[2] * rng.uniform(1, 3)))
    bars = [mf.Manifold.cube(tuple(np.where(np.arange(3) == k, arms[k], t[k])), True)
            for k in range(2 + (rng.random() < 0.5))]
    return _tm(mf.Manifold.batch_boolean(bars, mf.OpType.Add))


def _holed_block(rng):
    """A block (or plate) with one or two through holes of 4-12 sides along one axis."""
    ext = rng.uniform(0.3, 1.0, 3)
    axis = int(rng.integers(3))
    across = np.delete(ext, axis)
    holes = int(rng.integers(1, 3))
    r = rng.uniform(0.1, 0.17) * across.min() if holes == 2 else rng.uniform(0.15, 0.33) * across.min()
    block = mf.Manifold.cube(tuple(ext), True)
    spots = [0.0] if holes == 1 else [-across[0] / 4, across[0] / 4]
    turns = {0: [(0, 90, 0), (90, 0, 0)], 1: [(90, 0, 0)], 2: []}[axis]  # z onto `axis`, x onto across[0]
    for s in spots:
        hole = mf.Manifold.cylinder(ext[axis] * 2, r, r, _sides(rng, 4), True).translate((s, 0, 0))
        for turn in turns:
            hole = hole.rotate(turn)
        block = block - hole
    return _tm(block)


def _nut(rng):
    """A hex nut (or square nut): a 4- or 6-sided prism with a round-ish hole, optionally chamfered on top."""
    n = 6 if rng.random() < 0.8 else 4
    r, h = rng.uniform(0.35, 0.6), rng.uniform(0.2, 0.5)
    body = mf.Manifold.cylinder(h, r, r, n, True)
    if rng.random() < 0.4:  # chamfered: a 12-sided frustum, wider than the body below, trims its top corners
        body = body ^ mf.Manifold.cylinder(h, r * 1.25, r * 0.95, 12, True)
    return _z_to_y(_tm(body - mf.Manifold.cylinder(h * 2, r * rng.uniform(0.4, 0.6), -1, _sides(rng, 6), True)))


def _post_plate(rng):
    """A plate with one to four posts (n-gon prisms or boxes) standing on it."""
    plate = rng.uniform(0.6, 1.0, 3) * [1, 0.18, 1]
    parts = [mf.Manifold.cube(tuple(plate), True)]
    count = int(rng.choice([1, 1, 2, 4]))
    r, h = rng.uniform(0.08, 0.2), rng.uniform(0.2, 0.8)
    spots = [(0, 0)] if count == 1 else [(-1, 0), (1, 0)] if count == 2 else [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    n = 4 if rng.random() < 0.3 else _sides(rng)
    for sx, sz in spots:
        at = (sx * (plate[0] / 2 - r * 1.5), plate[1] / 2 + h / 2 - 0.01, sz * (plate[2] / 2 - r * 1.5))
        post = mf.Manifold.cylinder(h, r, r, n, True).rotate((90, 0, 0))  # along y
        parts.append(post.translate(at))
    return _tm(mf.Manifold.batch_boolean(parts, mf.OpType.Add))


SIMPLE_PARTS = ("ngon_prism", "wedge", "pyramid_cone", "chamfered_block", "section", "tube")


def _assembly(rng):
    """Two or three simple parts welded into one solid, each pushed into the others from one side (a part that
    only meets an empty corner of their box is pushed in further, to the centres if need be)."""
    result = None
    for _ in range(int(rng.integers(2, 4))):
        part = _HARD_SURFACE[SIMPLE_PARTS[int(rng.integers(len(SIMPLE_PARTS)))]](rng)
        part.apply_translation(-part.bounds.mean(0))
        m = mf.Manifold(mf.Mesh(part.vertices.astype(np.float32), part.faces.astype(np.uint32)))
        m = m.scale(tuple([rng.uniform(0.5, 0.9)] * 3)).rotate(tuple(rng.choice([0, 90], 3)))
        if result is None:
            result = m
            continue
        box, new = np.asarray(result.bounding_box()), np.asarray(m.bounding_box())
        centre, axis, side = (box[:3] + box[3:]) / 2, int(rng.integers(3)), rng.choice([-1, 1])
        shift = rng.uniform(-0.25, 0.25, 3) * (box[3:] - box[:3])
        for depth in (0.6, 0.0, -1.0):  # its centre this many half-sizes outside the face; -1: at the centre
            shift[axis] = side * ((box[3 + axis] - box[axis]) / 2 + depth * (new[3 + axis] - new[axis]) / 2)
            joined = result + m.translate(tuple(centre + shift * (depth > -1)))
            if len(joined.decompose()) == 1:
                result = joined
                break  # (a part that meets nothing even at the centre, inside a tube's hole, is left out)
    return _tm(result)


_HARD_SURFACE: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "ngon_prism": _ngon_prism, "wedge": _wedge, "pyramid_cone": _pyramid_cone, "chamfered_block": _chamfered_block,
    "section": _section, "tube": _tube, "stepped_block": _stepped_block, "cross": _cross,
    "holed_block": _holed_block, "nut": _nut, "post_plate": _post_plate, "assembly": _assembly,
}

_GENERAL: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "box": _box, "prism": _prism, "cone": _cone, "capsule": _capsule, "icosphere": _icosphere, "torus": _torus,
    "extrusion": _extrusion, "lathe": _lathe, "plane_cut": _plane_cut, "csg_union": _csg_union,
    "csg_difference": _csg_difference, "mirrored": _mirrored,
}
FAMILIES = _GENERAL | _HARD_SURFACE

# Named groups that `--families` accepts besides family names. "general" is the default mix (no --families); the
# hard-surface parts are asked for by name, as a whole or as the two halves of a curriculum (single solids first,
# then booleans and unions).
FAMILY_GROUPS: dict[str, tuple[str, ...]] = {
    "general": tuple(_GENERAL),
    "hard_surface": tuple(_HARD_SURFACE),
    "simple_parts": SIMPLE_PARTS,
    "compound_parts": tuple(f for f in _HARD_SURFACE if f not in SIMPLE_PARTS),
}

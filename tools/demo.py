"""The main job (`python3 build.py demo`): the add-on in headless Blender, AR against XSpecMesh on one object.

Builds and validates the extension zip, installs it into a fresh headless Blender (the bpy module of this Python),
models a high-poly part of a kind the shipped model was trained on (`make_sample`: by default a cross-shaped plate,
a Boolean union voxel-remeshed like a scan), runs Retopologize in AR mode, XSpecMesh mode and XSpecMesh with adaptive
heads with the same seed and candidates, and prints faces, seconds, SCR, speedup, Chamfer/Hausdorff distance to the
input (`xspecmesh.geometry.metrics.evaluate`), open edges and the fit. Writes out/demo.blend, out/demo_retopo.obj (the
XSpecMesh result), out/demo.png (input and result side by side, result edges drawn by a Wireframe-modifier copy) and
out/demo.json.

Without the shipped checkpoint (backend/xspecmesh/weights/default.safetensors) it stops with one message; pass
`--checkpoint PATH` to use another (the tests use a tiny random one).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "backend" / "xspecmesh" / "weights" / "default.safetensors"
MODULE = "bl_ext.user_default.xspecmesh"


class DemoError(RuntimeError):
    pass


def resolve_checkpoint(arg: str | None, default: Path = DEFAULT_CHECKPOINT) -> Path:
    if arg:
        path = Path(arg).expanduser().resolve()
        if not path.is_file():
            raise DemoError(f"checkpoint {path} does not exist")
        return path
    if not default.is_file():
        shown = default.relative_to(ROOT) if default.is_relative_to(ROOT) else default
        raise DemoError(f"no checkpoint is installed ({shown} does not exist): train the shipped model first (see the "
                        "README), or pass --checkpoint PATH")
    return default


# ------------------------------------------------------------------------------------------------ Blender


def start_blender(package: Path, checkpoint: Path, device: str):
    """Fresh headless Blender with the extension installed and pointed at this Python and the checkpoint."""
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="xspecmesh-demo-blender-")
    import bpy

    bpy.ops.extensions.package_install_files(filepath=str(package), repo="user_default", enable_on_install=True)
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_python, prefs.checkpoint, prefs.device = sys.executable, str(checkpoint), device
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    return bpy


SAMPLES = ("cross", "bracket", "scan", "chamfered")


def make_sample(bpy, kind: str = "cross"):
    """A high-poly part, as a user would select it. cross (the default) and bracket are compound hard-surface parts of
    the kinds the shipped model was trained on (docs/TRAINING.md; it handles crosses, not yet L-sections with a
    hole); scan and chamfered are the blocks the earlier box model knew.

    cross: a cross-shaped connector plate (two bars, 2 x 0.5 and 0.5 x 1.6, 0.4 thick) joined by a Boolean union and
    densified by a voxel Remesh, as a scan of a machined part is.
    scan: a plain block as a 3D scan would give it: densely subdivided (Simple) and its surface made slightly uneven
    by a Displace modifier (cloud noise, ±0.015 on a 2 m block). chamfered: a block with 45° chamfers on every edge,
    densified by Simple subdivision. bracket: an L-bracket (base plate and upright flange) with an octagonal hole
    through the base, made by Boolean modifiers and densified by a voxel Remesh, as a scan of a machined part is."""
    if kind == "bracket":
        return _bracket(bpy)
    if kind == "cross":
        return _cross(bpy)
    part = _box(bpy, "Part", (2.0, 1.3, 0.6), (0.0, 0.0, 0.0))
    if kind == "chamfered":
        bevel = part.modifiers.new("Chamfer", "BEVEL")
        bevel.width, bevel.segments = 0.12, 1
    dense = part.modifiers.new("Dense", "SUBSURF")
    dense.subdivision_type = "SIMPLE"
    dense.levels = dense.render_levels = 3 if kind == "chamfered" else 4
    if kind == "scan":
        noise = bpy.data.textures.new("ScanNoise", "CLOUDS")
        noise.noise_scale = 0.4
        uneven = part.modifiers.new("Uneven", "DISPLACE")
        uneven.texture, uneven.strength, uneven.mid_level = noise, 0.03, 0.5
        uneven.texture_coords = "GLOBAL"  # the noise does not stretch with the block's proportions
    return part


def _box(bpy, name: str, size, location):
    """A box object of this size (scale applied) centred at `location`."""
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=location)
    obj = bpy.context.active_object
    obj.name, obj.scale = name, size
    bpy.ops.object.transform_apply(scale=True)
    return obj


def _cross(bpy):
    part = _box(bpy, "Part", (2.0, 0.5, 0.4), (0.0, 0.0, 0.2))
    bar = _box(bpy, "Bar", (0.5, 1.6, 0.4), (0.0, 0.0, 0.2))
    return _remeshed(part, {bar: "UNION"}, voxel_size=0.03)


def _bracket(bpy):
    part = _box(bpy, "Part", (2.0, 1.2, 0.3), (0.0, 0.0, 0.15))
    flange = _box(bpy, "Flange", (0.3, 1.2, 1.3), (-0.85, 0.0, 0.8))  # overlaps the base: one body after the union
    bpy.ops.mesh.primitive_cylinder_add(vertices=8, radius=0.25, depth=1.0, location=(0.35, 0.0, 0.15))
    hole = bpy.context.active_object
    return _remeshed(part, {flange: "UNION", hole: "DIFFERENCE"}, voxel_size=0.04)


def _remeshed(part, others: dict, voxel_size: float):
    """`part` with a Boolean modifier for each of `others` (object -> operation), then a voxel Remesh; the others
    hidden."""
    for other, operation in others.items():
        boolean = part.modifiers.new(other.name, "BOOLEAN")
        boolean.object, boolean.operation = other, operation
    dense = part.modifiers.new("Dense", "REMESH")
    dense.mode, dense.voxel_size = "VOXEL", voxel_size
    for other in others:
        other.hide_set(True)
        other.hide_render = True
    return part


def world_mesh(bpy, obj):
    """The evaluated object in world space as a trimesh (read by the add-on's own sampling code)."""
    import trimesh

    tris, _ = sys.modules[f"{MODULE}.core.sampling"].object_triangles(obj, bpy.context.evaluated_depsgraph_get())
    return trimesh.Trimesh(tris.reshape(-1, 3), np.arange(len(tris) * 3).reshape(-1, 3), process=True)


def select_only(bpy, target) -> None:
    for obj in bpy.context.view_layer.objects:
        if obj is not None:  # a just-removed object may linger as None until the view layer updates
            obj.select_set(obj == target)


def retopologize(bpy, source, label: str, **settings) -> tuple[object, dict]:
    s = bpy.context.scene.xspecmesh
    for key, value in settings.items():
        setattr(s, key, value)
    select_only(bpy, source)
    bpy.context.view_layer.objects.active = source
    t = time.perf_counter()
    bpy.ops.xspecmesh.retopologize()
    wall = time.perf_counter() - t
    result = bpy.context.view_layer.objects.active
    if result is None or result == source:
        raise DemoError(f"{label}: Retopologize made no object")
    result.name = f"{source.name}_retopo_{label}"
    info = result["xspecmesh"].to_dict()
    stats = info["stats"]
    request = info["request"] if settings.get("mode") != "ar" else {}  # AR rows have no heads, δ or adaptive
    row = {"mode": label, "faces": len(result.data.polygons), "seconds": float(stats.get("seconds", wall)),
           "wall_seconds": wall, "tokens": stats.get("tokens"), "steps": stats.get("steps"), "scr": stats.get("scr"),
           "tokens_per_second": stats.get("tokens_per_second"), "heads": request.get("heads"),
           "delta": request.get("delta"), "adaptive": request.get("adaptive"),
           **{k: stats.get(k) for k in ("fit_distance_before", "fit_distance_after", "fit_skipped", "fit_error")}}
    return result, row


def add_metrics(bpy, ref, results: list, rows: list) -> None:
    """CD/HD and topology of each result against `ref`, the source as `world_mesh` reads it."""
    from xspecmesh.geometry.metrics import evaluate, topology

    for obj, row in zip(results, rows):
        pred = world_mesh(bpy, obj)
        row.update({k: v for k, v in evaluate(pred, ref, seed=0).items() if k in ("cd", "hd", "cd_10k", "failed")})
        topo = topology(pred)
        row["boundary_edges"] = topo.get("boundary_edges")
        row["non_manifold_edges"] = topo.get("non_manifold_edges")


# ------------------------------------------------------------------------------------------------ picture


def _wire_copy(scene, obj, name: str, thickness: float, color) -> object:
    """A copy of `obj` replaced by its edges (Wireframe modifier), drawn in `color`."""
    wire = obj.copy()
    wire.name = name
    for mod in list(wire.modifiers):
        if mod.type == "WIREFRAME":
            wire.modifiers.remove(mod)
    mod = wire.modifiers.new("Edges", "WIREFRAME")
    # Even offset keeps edge widths equal but turns the sharp corners of sliver triangles into long spikes.
    mod.thickness, mod.use_replace, mod.use_even_offset = thickness, True, False
    scene.collection.objects.link(wire)
    wire.color = color
    return wire


def render(bpy, source, source_mesh, result, path: Path, width: int) -> None:
    """Input (left) and result (right) side by side with their edges: Workbench, orthographic, object colours.
    `source_mesh`: the source as `world_mesh` reads it."""
    scene = bpy.context.scene
    verts = source_mesh.vertices
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    size = hi - lo
    longest = float(size.max())
    gap = size[0] * 1.35
    shown = result.copy()  # a linked copy moved to the right; the real result stays on the source
    shown.name = "Result (shown)"
    shown.location.x += gap
    scene.collection.objects.link(shown)
    shown.color = (0.55, 0.75, 0.95, 1)
    source.color = (0.9, 0.62, 0.35, 1)
    edges = [_wire_copy(scene, source, "Input edges", 0.0015 * longest, (0.55, 0.33, 0.15, 1)),
             _wire_copy(scene, shown, "Result edges", 0.006 * longest, (0.02, 0.02, 0.05, 1))]
    keep = {source, shown, *edges}
    for obj in scene.objects:
        obj.hide_render = obj.type == "MESH" and obj not in keep
    direction = np.array([0.35, -1.0, 0.6])  # three-quarter view from the front right, above
    labels = (f"input: {len(source_mesh.faces)} triangles", f"XSpecMesh: {len(result.data.polygons)} faces")
    for text, x in zip(labels, (0.0, gap)):
        curve = bpy.data.curves.new(text, "FONT")
        curve.body, curve.align_x, curve.size = text, "CENTER", 0.09 * longest
        label = bpy.data.objects.new(text, curve)
        label.location = ((lo[0] + hi[0]) / 2 + x, lo[1], lo[2] - 0.3 * longest)
        label.rotation_euler = (math.radians(57), 0, math.atan2(direction[0], -direction[1]))  # faces the camera
        label.color = (0.1, 0.1, 0.1, 1)
        scene.collection.objects.link(label)

    centre = np.array([(lo[0] + hi[0] + gap) / 2, (lo[1] + hi[1]) / 2, (lo[2] + hi[2]) / 2 - 0.1 * longest])
    direction /= np.linalg.norm(direction)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.location = (centre + direction * 10 * longest).tolist()
    from mathutils import Vector

    cam.rotation_euler = (-Vector(direction.tolist())).to_track_quat("-Z", "Y").to_euler()
    cam.data.type, cam.data.ortho_scale = "ORTHO", (gap + size[0]) * 1.25
    scene.camera = cam

    scene.render.engine = "BLENDER_WORKBENCH"
    shading = scene.display.shading
    shading.light, shading.color_type, shading.show_object_outline = "STUDIO", "OBJECT", False
    if scene.world is None:
        scene.world = bpy.data.worlds.new("World")
    scene.world.color = (1.0, 1.0, 1.0)
    scene.view_settings.view_transform = "Standard"
    scene.render.resolution_x, scene.render.resolution_y = width, width // 2
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


# ------------------------------------------------------------------------------------------------ main


def print_table(rows: list) -> None:
    head = (f"{'mode':<30}{'faces':>7}{'seconds':>9}{'SCR':>7}{'tok/s':>8}{'speedup':>9}{'CD':>8}{'HD':>8}"
            f"{'open edges':>12}{'fit: distance':>17}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        name = r["mode"] if r["heads"] is None else f"{r['mode']} D={r['heads']} δ={r['delta']:.2g}"
        scr = f"{r['scr']:.2f}" if isinstance(r.get("scr"), (int, float)) else "–"
        tps = f"{r['tokens_per_second']:.0f}" if isinstance(r.get("tokens_per_second"), (int, float)) else "–"
        print(f"{name:<30}{r['faces']:>7}{r['seconds']:>9.2f}{scr:>7}{tps:>8}{r['speedup']:>8.2f}×"
              f"{r.get('cd', float('nan')):>8.4f}{r.get('hd', float('nan')):>8.4f}{r.get('boundary_edges', '–'):>12}"
              f"{_fit_cell(r):>17}")
    print("open edges: boundary edges of the result (0: closed). fit: mean distance between the result's surface and "
          "the input points (normalized units) as decoded → after Fit to Source")
    print()


def _fit_cell(row: dict) -> str:
    before, after = row.get("fit_distance_before"), row.get("fit_distance_after")
    if isinstance(before, float) and isinstance(after, float):
        return f"{before:.4f} → {after:.4f}"
    return "failed" if row.get("fit_error") else "skipped (limit)" if row.get("fit_skipped") else "off"


def run(args) -> int:
    checkpoint = resolve_checkpoint(args.checkpoint)
    sys.path.insert(0, str(ROOT / "tools"))
    import zip as zip_tool

    package = zip_tool.build(ROOT / "dist")
    zip_tool.validate(package)
    print(f"extension: {package} (validated)", flush=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    bpy = start_blender(package, checkpoint, args.device)
    source = make_sample(bpy, args.sample)
    source_mesh = world_mesh(bpy, source)  # read once: triangle count, metrics, picture
    n_in = len(source_mesh.faces)
    print(f"input: '{source.name}', {n_in} triangles after modifiers", flush=True)
    common = dict(max_faces=args.max_faces, seed=args.seed, temperature=args.temperature, hide_source=False,
                  fit=args.fit, candidates=args.candidates)
    warm, _ = retopologize(bpy, source, "warmup", mode="spec", **{**common, "max_faces": 8})
    bpy.data.objects.remove(warm)  # first-call costs (thread pools, allocator) out of the timings
    bpy.context.view_layer.update()
    ar, ar_row = retopologize(bpy, source, "AR", mode="ar", **common)
    spec, spec_row = retopologize(bpy, source, "XSpecMesh", mode="spec", heads=args.heads, delta=args.delta,
                                  accept="threshold", adaptive=False, **common)
    adaptive, adaptive_row = retopologize(bpy, source, "XSpecMesh adaptive", mode="spec", heads=args.heads,
                                          delta=args.delta, accept="threshold", adaptive=True, **common)
    rows = [ar_row, spec_row, adaptive_row]
    for r in rows:
        r["speedup"] = ar_row["seconds"] / r["seconds"] if r["seconds"] > 0 else float("nan")
    add_metrics(bpy, source_mesh, [ar, spec, adaptive], rows)
    print_table(rows)

    select_only(bpy, spec)
    bpy.ops.wm.obj_export(filepath=str(out / "demo_retopo.obj"), export_selected_objects=True,
                          export_materials=False, apply_modifiers=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "demo.blend"), copy=True)
    render(bpy, source, source_mesh, spec, out / "demo.png", args.width)
    report = {"checkpoint": str(checkpoint), "input_triangles": n_in, "rows": rows,
              "backend": bpy.context.preferences.addons[MODULE].preferences.device}
    (out / "demo.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    for name in ("demo.blend", "demo_retopo.obj", "demo.png", "demo.json"):
        print(f"wrote {out / name}")
    sys.modules[f"{MODULE}.core.service"].stop()
    return 0 if all(r["faces"] > 0 for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="model to use (default: the shipped default.safetensors)")
    parser.add_argument("--out", default=str(ROOT / "out"), help="output folder (default: out/)")
    parser.add_argument("--heads", type=int, default=4, help="drafting heads D for XSpecMesh mode")
    parser.add_argument("--delta", type=float, default=0.5, help="acceptance threshold δ")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--max-faces", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=4,
                        help="decode this many per run and keep the closed one nearest the input (default 4, what "
                             "parts call for; the panel's Candidates)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--sample", choices=SAMPLES, default="cross",
                        help="the object to retopologize: a cross-shaped plate (default), an L-bracket with a hole, "
                             "a scanned block or a chamfered block")
    parser.add_argument("--no-fit", dest="fit", action="store_false",
                        help="keep the vertices where the model put them (Fit to Source off)")
    parser.add_argument("--width", type=int, default=1280, help="picture width in pixels (height is half)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # an operator's ERROR report
        print(f"demo: error: {str(exc).strip()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

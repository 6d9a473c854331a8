"""The add-on in real Blender, headless: install the built zip, run every operator and every error case, in each
supported Blender: bpy 5.0 (this venv) and the LTS releases 4.2 and 4.5 (`.venv-bpy42`, `.venv-bpy45`, made by
`build.py`).

Blender runs in one subprocess per version (this file run as a script by that version's Python), so bpy's module
state and the backend process stay out of the pytest process; the backend runs in this (pytest's) Python. The child installs the zip with Blender's own installer, points the
preferences at this Python and a tiny random checkpoint, runs each `scenario_*` below (plain asserts), and writes
pass/fail with the traceback to a JSON file; each pytest test reports one scenario. Generations are capped at a few
faces so the whole module stays well under a minute.

Not covered here (no window in background mode): the modal timer's own events; it runs the same `Run.step`. Undo
is covered: background Blender keeps a global undo stack when operators are called with undo on, as the UI calls them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "bl_ext.user_default.xspecmesh"
# (Blender version, the Python that imports its bpy); the first is this venv's, the others build.py's LTS venvs
BLENDERS = (("5.0", Path(sys.executable)), ("4.2", ROOT / ".venv-bpy42" / "bin" / "python"),
            ("4.5", ROOT / ".venv-bpy45" / "bin" / "python"))
SCENARIOS = (
    "installed",
    "settings_match_schema",
    "retopologize",
    "settings_reach_backend",
    "ar_mode_and_hide_source",
    "batch",
    "cancel",
    "batch_cancel",
    "undo_redo",
    "object_axes",
    "abort_on_file_load",
    "panel_draws",
    "modal_path",
    "error_not_mesh",
    "error_empty_mesh",
    "error_missing_collection",
    "error_python_missing",
    "error_no_torch",
    "error_backend_crash",
    "cancel_while_starting",
    "unregister_stops_backend",
    "install_needs_online_access",
)

# ------------------------------------------------------------------------------------------------ pytest side

if __name__ != "__main__":
    import pytest

    pytestmark = [
        pytest.mark.blender,
    ]

    @pytest.fixture(scope="module", params=BLENDERS, ids=[version for version, _ in BLENDERS])
    def blender_run(request, tmp_path_factory):
        version, blender_python = request.param
        if version == "5.0" and importlib.util.find_spec("bpy") is None or not blender_python.exists():
            pytest.skip(f"no bpy {version} ({blender_python} is missing: python3 build.py setup makes it)")
        tmp = tmp_path_factory.mktemp("blender")
        sys.path.insert(0, str(ROOT / "tools"))
        try:
            import zip as zip_tool
        finally:
            sys.path.pop(0)
        package = zip_tool.build(tmp / "dist", with_checkpoint=False)
        zip_tool.validate(package)
        from xspecmesh.model.checkpoint import write_random_checkpoint

        checkpoint = tmp / "tiny.safetensors"
        write_random_checkpoint(checkpoint, heads=4, seed=0)
        results = tmp / "results.json"
        cmd = [str(blender_python), __file__, "--zip", str(package), "--checkpoint", str(checkpoint),
               "--results", str(results), "--tmp", str(tmp), "--backend-python", sys.executable,
               "--blender-version", version]
        env = {k: v for k, v in os.environ.items() if k != "XSPECMESH_BACKEND_PYTHON"}
        env["BLENDER_USER_RESOURCES"] = str(tmp / "blender_user")
        env["OMP_NUM_THREADS"] = "1"  # the tiny model gains nothing from threads on a shared machine
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
        log = proc.stdout[-6000:] + proc.stderr[-6000:]
        if not results.exists():
            pytest.fail(f"the Blender session wrote no results (exit {proc.returncode}):\n{log}")
        return json.loads(results.read_text()), log

    @pytest.mark.slow
    def test_install_backend_end_to_end(tmp_path):
        """Install Backend for real, headless in Blender 5.0: a venv in the extension's user directory (under this
        test's folder), torch and the backend's packages from the registry (pip's cache and this machine's torch
        wheel keep it to minutes), then the backend started from it answers hello and retopologizes a cube."""
        sys.path.insert(0, str(ROOT / "tools"))
        try:
            import zip as zip_tool
        finally:
            sys.path.pop(0)
        package = zip_tool.build(tmp_path / "dist", with_checkpoint=False)
        from xspecmesh.model.checkpoint import write_random_checkpoint

        checkpoint = tmp_path / "tiny.safetensors"
        write_random_checkpoint(checkpoint, heads=4, seed=0)
        results = tmp_path / "results.json"
        cmd = [sys.executable, __file__, "--zip", str(package), "--checkpoint", str(checkpoint), "--results",
               str(results), "--tmp", str(tmp_path), "--backend-python", sys.executable, "--blender-version", "5.0",
               "--only", "install_backend"]
        env = {k: v for k, v in os.environ.items() if k != "XSPECMESH_BACKEND_PYTHON"}
        env["BLENDER_USER_RESOURCES"] = str(tmp_path / "blender_user")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
        log = proc.stdout[-6000:] + proc.stderr[-6000:]
        assert results.exists(), log
        outcome = json.loads(results.read_text())["install_backend"]
        assert outcome["ok"], outcome["error"] + log

    @pytest.mark.parametrize("name", SCENARIOS)
    def test_blender(blender_run, name):
        results, log = blender_run
        if name not in results:
            pytest.fail(f"scenario {name} did not run; Blender output:\n{log}")
        if not results[name]["ok"]:
            pytest.fail(results[name]["error"])


# ------------------------------------------------------------------------------------------------ Blender side


class Session:
    """What every scenario needs: bpy, the add-on's modules, the preferences, scratch space."""

    def __init__(self, args):
        import bpy

        self.bpy = bpy
        self.args = args
        self.addon = sys.modules[MODULE]
        self.job = sys.modules[f"{MODULE}.blender.job"]
        self.service = sys.modules[f"{MODULE}.core.service"]
        self.schema = sys.modules[f"{MODULE}.core.settings_schema"]
        self.prefs = bpy.context.preferences.addons[MODULE].preferences
        self.tmp = Path(args.tmp)

    @property
    def settings(self):
        return self.bpy.context.scene.xspecmesh

    def reset(self) -> None:
        """Empty scene, default settings, working preferences, no listeners."""
        bpy = self.bpy
        for obj in list(bpy.data.objects):
            bpy.data.objects.remove(obj)
        for mesh in list(bpy.data.meshes):
            bpy.data.meshes.remove(mesh)
        for coll in list(bpy.data.collections):
            bpy.data.collections.remove(coll)
        self.job.listeners.clear()
        self.prefs = bpy.context.preferences.addons[MODULE].preferences  # anew: a scenario may re-enable the add-on
        self.prefs.backend_python = self.args.backend_python
        self.prefs.checkpoint = self.args.checkpoint
        self.prefs.device = "cpu"
        s = self.settings
        for name in ("mode", "delta", "heads", "accept", "temperature", "seed", "candidates", "hide_source",
                     "object_axes", "fit"):
            s.property_unset(name)
        s.max_faces = 4

    def cube(self, name="Cube", location=(0.0, 0.0, 0.0), collection=None, levels=2):
        bpy = self.bpy
        mesh = bpy.data.meshes.new(name)
        h = 1.0
        verts = [(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)]
        faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
        mesh.from_pydata(verts, [], faces)
        obj = bpy.data.objects.new(name, mesh)
        obj.location = location
        (collection or bpy.context.scene.collection).objects.link(obj)
        mod = obj.modifiers.new("Subdivision", "SUBSURF")
        mod.levels = levels
        self.activate(obj)
        return obj

    def activate(self, obj) -> None:
        self.bpy.context.view_layer.update()
        for other in self.bpy.context.view_layer.objects:
            other.select_set(False)
        if obj is not None:
            obj.select_set(True)
        self.bpy.context.view_layer.objects.active = obj

    def world_bbox(self, obj):
        import numpy as np

        depsgraph = self.bpy.context.evaluated_depsgraph_get()
        ev = obj.evaluated_get(depsgraph)
        mesh = ev.to_mesh()
        co = np.array([v.co[:] for v in mesh.vertices])
        ev.to_mesh_clear()
        m = np.array(obj.matrix_world)
        world = co @ m[:3, :3].T + m[:3, 3]
        return world.min(axis=0), world.max(axis=0)

    def snapshot(self, obj) -> tuple:
        return (tuple(tuple(v.co) for v in obj.data.vertices), len(obj.data.polygons),
                tuple(m.name for m in obj.modifiers), tuple(map(tuple, obj.matrix_world)))

    def stats(self, obj) -> dict:
        return obj["xspecmesh"].to_dict()

    def raises(self, fn, *needles) -> str:
        """fn() must fail with a readable report (bpy.ops turns an ERROR report into RuntimeError)."""
        try:
            fn()
        except RuntimeError as exc:
            text = str(exc)
            assert any(n.lower() in text.lower() for n in needles), f"unexpected message: {text}"
            assert "Traceback" not in text, text
            return text
        raise AssertionError(f"expected a failure mentioning {needles}")

    def no_leftovers(self, names_before) -> None:
        after = {o.name for o in self.bpy.data.objects}
        assert after == names_before, f"objects left behind: {sorted(after - names_before)}"
        assert self.job.ACTIVE is None


def scenario_installed(s: Session):
    bpy = s.bpy
    assert MODULE in bpy.context.preferences.addons
    for op in ("retopologize", "retopologize_collection", "cancel", "test_backend", "stop_backend"):
        assert hasattr(bpy.ops.xspecmesh, op), op
    assert len(s.addon.CLASSES) == 10
    for name in ("delta", "heads", "accept", "max_faces", "temperature", "seed", "mode"):
        assert hasattr(s.settings, name), name
    for name in ("backend_python", "checkpoint", "device"):
        assert hasattr(s.prefs, name), name
    bpy.ops.xspecmesh.test_backend()
    assert s.service.heads_cap() == 4 and "device cpu" in s.service.describe(), s.service.describe()
    s.settings.heads = 8  # the slider goes to 8; reading it is capped by the checkpoint's 4 heads
    assert s.settings.heads == 4
    assert s.settings.to_request().heads == 4
    assert "torch" not in sys.modules, "the add-on (or Blender) imported torch"
    assert "%d.%d" % bpy.app.version[:2] == s.args.blender_version, bpy.app.version_string


def scenario_settings_match_schema(s: Session):
    """Each scene property's default and range are the schema's (the panel's `max_faces` 0 is the schema's None)."""
    props = s.settings.bl_rna.properties
    for setting in s.schema.DECODE:
        if setting.name not in props:
            assert setting.name in ("topk_accept", "top_k", "top_p", "max_tokens", "precision", "tree",
                                    "confidence"), setting.name  # not in the panel (precision is a preference,
            # checked below; tree and confidence are speed settings whose defaults the backend applies)
            continue
        prop = props[setting.name]
        if setting.choices:
            assert {item.identifier for item in prop.enum_items} <= set(setting.values), setting.name
            assert prop.default == setting.default, setting.name
        elif setting.optional:
            assert prop.default == 0 and prop.hard_min == 0, setting.name
        else:
            assert prop.default == setting.default, (setting.name, prop.default, setting.default)
            if setting.type is not bool:
                assert (prop.hard_min, prop.hard_max) == (setting.min, setting.max), setting.name
    s.settings.property_unset("max_faces")
    assert s.settings.to_request().settings() == {k: v for k, v in s.schema.defaults().items()
                                                  if k not in ("topk_accept", "precision", "tree", "confidence")}
    s.settings.seed = 2**31 - 1
    assert s.settings.to_request().seed == 2**31 - 1
    assert s.prefs.precision == "auto" and {i.identifier for i in s.prefs.bl_rna.properties["precision"].enum_items} \
        == set(s.schema.SETTINGS["precision"].values)


def scenario_retopologize(s: Session):
    bpy = s.bpy
    src = s.cube(location=(2.0, 1.0, 0.5))
    src.rotation_euler = (0.3, 0.0, 0.5)
    src.scale = (1.5, 1.0, 0.8)
    bpy.context.view_layer.update()
    before = s.snapshot(src)
    lo_src, hi_src = s.world_bbox(src)
    bpy.ops.xspecmesh.retopologize()
    out = bpy.data.objects["Cube_retopo"]
    mesh = out.data
    assert 0 < len(mesh.polygons) <= s.settings.max_faces
    assert all(p.loop_total == 3 and not p.use_smooth for p in mesh.polygons)  # triangles, flat shaded
    assert len({v for p in mesh.polygons for v in p.vertices}) == len(mesh.vertices), "unreferenced vertices"
    assert set(out.users_collection) == set(src.users_collection)
    assert all(abs(a - b) < 1e-5 for ra, rb in zip(out.matrix_world, src.matrix_world) for a, b in zip(ra, rb))
    lo, hi = s.world_bbox(out)
    assert (lo <= hi_src + 1e-4).all() and (hi >= lo_src - 1e-4).all(), (lo, hi, lo_src, hi_src)
    # Back in the source's frame: the backend's [-1, 1] cube maps onto the source's box centre ± longest side / 1.9.
    centre, half = (lo_src + hi_src) / 2, (hi_src - lo_src).max() / 1.9
    assert (lo >= centre - half - 1e-4).all() and (hi <= centre + half + 1e-4).all(), "result outside the frame"
    assert s.snapshot(src) == before, "the source changed"
    assert not src.hide_get()
    assert bpy.context.view_layer.objects.active == out
    info = s.stats(out)
    assert info["state"] == "done" and info["stats"]["faces"] >= len(mesh.polygons)
    assert s.job.LAST.outcomes[0].faces == len(mesh.polygons)
    assert "torch" not in sys.modules


def scenario_settings_reach_backend(s: Session):
    bpy = s.bpy
    src = s.cube()
    st = s.settings
    assert st.fit  # on by default
    st.heads, st.delta, st.accept, st.temperature, st.seed, st.max_faces = 2, 1.0, "threshold", 0.7, 7, 6
    st.fit = False
    bpy.ops.xspecmesh.retopologize()
    info = s.stats(bpy.data.objects["Cube_retopo"])
    req = info["request"]
    assert (req["mode"], req["heads"], req["delta"], req["accept"], req["seed"], req["max_faces"], req["fit"],
            req["candidates"]) == ("spec", 2, 1.0, "threshold", 7, 6, False, 1), req
    assert abs(req["temperature"] - 0.7) < 1e-6
    stats = info["stats"]
    assert "fit_seconds" not in stats, stats
    assert len(stats["accept_hist"]) == 3, stats  # 0..D accepted drafts per step: D = 2 reached the backend
    assert stats["scr"] == 1.0, stats  # δ = 1 reached it too: p > 1 never holds, every draft is rejected
    st.delta, st.fit = 0.0, True  # now every draft the backbone does not rule out is kept; and fit to the source
    s.activate(src)
    bpy.ops.xspecmesh.retopologize()
    stats = s.stats(bpy.data.objects["Cube_retopo.001"])["stats"]
    assert stats["scr"] > 1.0 and sum(stats["accept_hist"][1:]) > 0, stats
    # the backend would fit it, but this mesh was cut at max_faces (a random model does not stop by itself)
    assert "limit" in stats["fit_skipped"], stats
    assert "not fitted to the source (cut at the face or token limit)" in s.job.LAST.outcomes[0].summary()
    looped = s.job.Outcome("Cube", "done", "Cube_retopo", faces=3, stats={"stalled": True, "fit_skipped": "stalled"})
    assert "not fitted to the source (the model looped" in looped.summary()
    st.candidates = 2
    s.activate(src)
    bpy.ops.xspecmesh.retopologize()
    info = s.stats(bpy.data.objects["Cube_retopo.002"])
    assert info["request"]["candidates"] == 2, info  # two decoded, one kept
    assert info["stats"]["candidates"] == 2 and info["stats"]["candidate"] in (0, 1), info


def scenario_ar_mode_and_hide_source(s: Session):
    bpy = s.bpy
    src = s.cube()
    s.settings.mode = "ar"
    s.settings.hide_source = True
    bpy.ops.xspecmesh.retopologize()
    info = s.stats(bpy.data.objects["Cube_retopo"])
    assert info["request"]["mode"] == "ar" and info["stats"]["scr"] == 1.0, info
    assert src.hide_get(), "hide_source did not hide the source"
    assert src.name in bpy.data.objects


def scenario_batch(s: Session):
    bpy = s.bpy
    parts = bpy.data.collections.new("Parts")
    bpy.context.scene.collection.children.link(parts)
    a = s.cube("A", (0, 0, 0), parts)
    b = s.cube("B", (3, 0, 0), parts, levels=1)
    empty = bpy.data.objects.new("Empty", bpy.data.meshes.new("Empty"))
    parts.objects.link(empty)
    parts.objects.link(bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera")))  # not a mesh: ignored
    before = {o.name: s.snapshot(o) for o in (a, b, empty)}
    bpy.ops.xspecmesh.retopologize_collection(collection="Parts")  # a skipped object is a warning, not an error
    out = bpy.data.collections["Parts (retopo)"]
    assert sorted(o.name for o in out.objects) == ["A_retopo", "B_retopo"]
    assert all(len(o.data.polygons) > 0 for o in out.objects)
    outcomes = {o.source: o for o in s.job.LAST.outcomes}
    assert sorted(outcomes) == ["A", "B", "Empty"]
    assert outcomes["Empty"].state == "skipped" and "no faces" in outcomes["Empty"].message
    assert "Empty: skipped" in outcomes["Empty"].summary()
    for name in ("A", "B"):
        o = outcomes[name]
        assert o.state == "done" and o.faces > 0 and o.seconds > 0 and o.scr is not None
        assert "faces in" in o.summary() and "SCR" in o.summary()
        assert o.stats["batch"] == 2  # sent at once, decoded together by the backend
    assert {o.name: s.snapshot(o) for o in (a, b, empty)} == before
    assert "Camera_retopo" not in bpy.data.objects


def scenario_undo_redo(s: Session):
    """One undo removes a retopology (single or batch) and leaves the sources as they were; redo brings it back."""
    bpy = s.bpy
    parts = bpy.data.collections.new("Parts")
    bpy.context.scene.collection.children.link(parts)
    s.cube("A", (0, 0, 0), parts)
    s.cube("B", (3, 0, 0), parts, levels=1)
    bpy.ops.ed.undo_push(message="scene ready")
    names = {o.name for o in bpy.data.objects}
    before = {name: s.snapshot(bpy.data.objects[name]) for name in names}

    def scene():  # undo reloads the data: look everything up by name again
        return {o.name for o in bpy.data.objects}, {c.name for c in bpy.data.collections}

    assert bpy.ops.xspecmesh.retopologize("EXEC_DEFAULT", True) == {"FINISHED"}  # True: push undo, as the UI does
    assert scene()[0] == names | {"B_retopo"}
    bpy.ops.ed.undo()
    assert scene() == (names, {"Parts"})
    assert {name: s.snapshot(bpy.data.objects[name]) for name in names} == before
    bpy.ops.ed.redo()
    assert len(bpy.data.objects["B_retopo"].data.polygons) > 0
    bpy.ops.ed.undo()

    assert bpy.ops.xspecmesh.retopologize_collection("EXEC_DEFAULT", True, collection="Parts") == {"FINISHED"}
    assert scene() == (names | {"A_retopo", "B_retopo"}, {"Parts", "Parts (retopo)"})
    bpy.ops.ed.undo()
    assert scene() == (names, {"Parts"})
    assert {name: s.snapshot(bpy.data.objects[name]) for name in names} == before


def scenario_object_axes(s: Session):
    import numpy as np

    bpy = s.bpy
    src = s.cube(location=(2.0, 1.0, 0.5), levels=0)
    src.rotation_euler = (0.0, 0.0, 0.5)  # turned about Blender's up axis, as a part placed in a scene would be
    src.scale = (1.5, 1.0, 0.8)
    bpy.context.view_layer.update()
    before = s.snapshot(src)
    for object_axes in (False, True):  # the model sees the block turned, or upright in its own axes
        cloud = s.job.sample_ahead(src, 0, object_axes)[src.name]
        normals = np.frombuffer(cloud.data, dtype="<f4").reshape(-1, 6)[:, 3:]
        assert np.allclose(np.abs(normals).max(axis=1), 1.0, atol=1e-5) == object_axes
    s.settings.object_axes = True
    bpy.ops.xspecmesh.retopologize()
    out = bpy.data.objects["Cube_retopo"]
    assert s.stats(out)["object_axes"]
    assert all(abs(a - b) < 1e-5 for ra, rb in zip(out.matrix_world, src.matrix_world) for a, b in zip(ra, rb))
    # In the source's own (scaled) axes the backend's [-1, 1] cube is the box centre ± longest side / 1.9.
    local = np.array([v.co[:] for v in out.data.vertices]) * np.array(src.scale)
    assert len(local) and (np.abs(local) <= 3.0 / 1.9 + 1e-4).all(), "result outside the object's frame"
    assert s.snapshot(src) == before, "the source changed"


def scenario_cancel(s: Session):
    bpy = s.bpy
    s.cube()
    s.settings.max_faces = 5000
    seen = []

    def cancel_once(run):
        if run.job is not None and run.job.faces >= 2 and not seen:
            seen.append(run.job.faces)
            bpy.ops.xspecmesh.cancel()

    s.job.listeners.append(cancel_once)
    t = time.perf_counter()
    bpy.ops.xspecmesh.retopologize()  # a cancel is a warning: no exception
    assert time.perf_counter() - t < 20
    assert seen, "the job ended before it could be cancelled"
    assert "Cube_retopo" not in bpy.data.objects
    partial = bpy.data.objects["Cube_retopo (partial)"]
    assert 0 < len(partial.data.polygons) < 5000
    assert s.stats(partial)["state"] == "cancelled"
    assert s.job.ACTIVE is None and s.job.LAST.outcomes[0].state == "cancelled"
    assert not bpy.ops.xspecmesh.cancel.poll()


def scenario_batch_cancel(s: Session):
    bpy = s.bpy
    parts = bpy.data.collections.new("Parts")
    bpy.context.scene.collection.children.link(parts)
    for i, name in enumerate("ABC"):
        s.cube(name, (3 * i, 0, 0), parts, levels=1)

    s.settings.max_faces = 5000
    seen = []

    def cancel_mid_run(run):
        if not seen and len(run.jobs) == 3 and any(j.faces >= 1 for j in run.jobs):
            seen.append(True)
            bpy.ops.xspecmesh.cancel()  # stops every object of the collection at once

    s.job.listeners.append(cancel_mid_run)
    t = time.perf_counter()
    bpy.ops.xspecmesh.retopologize_collection(collection="Parts")
    assert time.perf_counter() - t < 30 and seen
    outcomes = s.job.LAST.outcomes
    assert [o.source for o in outcomes] == ["A", "B", "C"]
    assert all(o.state == "cancelled" for o in outcomes), [o.summary() for o in outcomes]
    kept = sorted(o.name for o in bpy.data.collections["Parts (retopo)"].objects)
    assert kept == sorted(o.result for o in outcomes if o.result) and all("(partial)" in k for k in kept)


def scenario_abort_on_file_load(s: Session):
    bpy = s.bpy
    s.cube()
    s.settings.max_faces = 5000
    names = {o.name for o in bpy.data.objects}

    def load_file(run):  # what the load_pre handler does when another .blend opens mid-run
        if run.job is not None and run.job.faces >= 1:
            s.addon._on_load_pre(None)

    s.job.listeners.append(load_file)
    bpy.ops.xspecmesh.retopologize()
    s.no_leftovers(names)
    s.job.listeners.clear()
    s.settings.max_faces = 4
    bpy.ops.xspecmesh.retopologize()  # the backend skips the abandoned request and serves the next one
    assert len(bpy.data.objects["Cube_retopo"].data.polygons) > 0


class _Layout:
    """Records what a panel draws (background Blender has no UI to draw into)."""

    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return _Layout(self.calls)

        return call


def _check_draw(s: Session, panel, owner=None) -> list:
    """Draw `panel` (or preferences `owner`) into a recorder; every property, operator and icon must exist."""
    from types import SimpleNamespace

    calls = []
    if owner is None:
        panel.draw(SimpleNamespace(layout=_Layout(calls), draw_progress=panel.draw_progress), s.bpy.context)
    else:
        fake = SimpleNamespace(layout=_Layout(calls), bl_rna=owner.bl_rna,
                               **{k: getattr(owner, k) for k in owner.bl_rna.properties.keys() if k != "rna_type"})
        type(owner).draw(fake, s.bpy.context)
    icons = set(s.bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items.keys())
    for name, args, kwargs in calls:
        assert kwargs.get("icon", "NONE") in icons, kwargs["icon"]
        if name == "prop":
            data, prop = args[0], args[1]
            assert prop in data.bl_rna.properties, prop
        elif name == "operator":
            group, op = args[0].split(".")
            assert hasattr(getattr(s.bpy.ops, group), op), args[0]
        elif name == "progress":
            assert 0.0 <= kwargs["factor"] <= 1.0
    return [c[0] for c in calls]


def scenario_panel_draws(s: Session):
    bpy = s.bpy
    panel = next(c for c in s.addon.CLASSES if c.__name__.endswith("_PT_main"))
    assert (panel.bl_space_type, panel.bl_region_type, panel.bl_category) == ("VIEW_3D", "UI", "XSpecMesh")
    idle = _check_draw(s, panel)
    assert "progress" not in idle and idle.count("prop") >= 7
    assert _check_draw(s, None, owner=s.prefs).count("operator") == 3  # Test, Stop, Install Backend
    s.cube()
    running = []
    s.job.listeners.append(lambda run: running.append(_check_draw(s, panel)) if run.job and not running else None)
    bpy.ops.xspecmesh.retopologize()
    assert running and "progress" in running[0]
    ops = [c for c in running[0] if c == "operator"]
    assert ops, "no Cancel button while running"


def scenario_modal_path(s: Session):
    """The interactive path without a window: the operator's own modal code, driven by fake timer/Esc events."""
    from types import SimpleNamespace

    bpy = s.bpy
    ops = sys.modules[f"{MODULE}.blender.operators"]
    assert {"type", "value"} <= set(bpy.types.Event.bl_rna.properties.keys())  # all the fake events carry
    src = s.cube()

    class WindowManager:
        def __init__(self):
            self.timers, self.handlers, self.removed = [], [], []

        def event_timer_add(self, step, window=None):
            self.timers.append(object())
            return self.timers[-1]

        def modal_handler_add(self, op):
            self.handlers.append(op)

        def event_timer_remove(self, timer):
            self.removed.append(timer)

    class Probe(ops._RunOperator):  # the real operator's code on a plain object (bpy operators need a window)
        make_run = ops.XSPECMESH_OT_retopologize.make_run
        conclude = ops.XSPECMESH_OT_retopologize.conclude

        def __init__(self):
            self.reports = []

        def report(self, kind, text):
            self.reports.append((next(iter(kind)), text))

    def drive(max_faces, esc_after=None):
        s.settings.max_faces = max_faces
        s.activate(src)
        real, wm = bpy.context, WindowManager()
        ctx = SimpleNamespace(window=object(), window_manager=wm, screen=None, scene=real.scene,
                              preferences=real.preferences, view_layer=real.view_layer, active_object=src,
                              selected_objects=[src])
        op = Probe()
        assert op.start_modal(ctx) == {"RUNNING_MODAL"} and wm.handlers == [op]
        assert not bpy.ops.xspecmesh.retopologize.poll()  # greyed out while a job runs
        tick = SimpleNamespace(type="TIMER", value="NOTHING")  # only what bpy.types.Event has
        assert op.modal(ctx, SimpleNamespace(type="MOUSEMOVE", value="NOTHING")) == {"PASS_THROUGH"}
        for _ in range(3000):
            if esc_after is not None and s.job.ACTIVE.job is not None and s.job.ACTIVE.job.faces >= esc_after:
                assert op.modal(ctx, SimpleNamespace(type="ESC", value="PRESS")) == {"RUNNING_MODAL"}
                esc_after = None
            result = op.modal(ctx, tick)
            if result != {"RUNNING_MODAL"}:
                break
            time.sleep(0.01)
        assert result == {"FINISHED"} and wm.removed == wm.timers and s.job.ACTIVE is None
        return op.reports

    reports = drive(4)
    assert reports[-1][0] == "INFO" and "Cube_retopo:" in reports[-1][1] and "SCR" in reports[-1][1], reports
    assert 0 < len(bpy.data.objects["Cube_retopo"].data.polygons) <= 4
    reports = drive(5000, esc_after=2)
    assert reports[-1][0] == "WARNING" and "Cancelled" in reports[-1][1], reports
    partial = s.job.LAST.outcomes[0].result  # "Cube_retopo.001 (partial)": the first result kept its name
    assert partial.endswith(" (partial)") and len(bpy.data.objects[partial].data.polygons) >= 2


def scenario_error_not_mesh(s: Session):
    bpy = s.bpy
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    bpy.context.scene.collection.objects.link(cam)
    s.activate(cam)
    names = {o.name for o in bpy.data.objects}
    assert not bpy.ops.xspecmesh.retopologize.poll()  # the button is greyed out
    s.raises(bpy.ops.xspecmesh.retopologize, "not a mesh")
    s.activate(None)
    s.raises(bpy.ops.xspecmesh.retopologize, "no active object")
    s.no_leftovers(names)


def scenario_error_empty_mesh(s: Session):
    bpy = s.bpy
    empty = bpy.data.objects.new("Nothing", bpy.data.meshes.new("Nothing"))
    bpy.context.scene.collection.objects.link(empty)
    s.activate(empty)
    names = {o.name for o in bpy.data.objects}
    s.raises(bpy.ops.xspecmesh.retopologize, "no faces")
    s.no_leftovers(names)


def scenario_error_missing_collection(s: Session):
    s.raises(lambda: s.bpy.ops.xspecmesh.retopologize_collection(collection="Nope"), "no collection named")


def scenario_error_python_missing(s: Session):
    bpy = s.bpy
    s.cube()
    names = {o.name for o in bpy.data.objects}
    s.prefs.backend_python = str(s.tmp / "no-such-python")
    s.raises(bpy.ops.xspecmesh.retopologize, "not found")
    s.raises(bpy.ops.xspecmesh.test_backend, "not found")
    s.no_leftovers(names)


def scenario_error_no_torch(s: Session):
    bpy = s.bpy
    venv = s.tmp / "venv-without-torch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    s.prefs.backend_python = str(venv / "bin" / "python")
    s.cube()
    names = {o.name for o in bpy.data.objects}
    s.raises(bpy.ops.xspecmesh.retopologize, "torch", "numpy")
    s.no_leftovers(names)


def scenario_error_backend_crash(s: Session):
    bpy = s.bpy
    src = s.cube()
    s.settings.max_faces = 5000

    def crash(run):
        client = s.service.current()
        if run.job is not None and run.job.faces >= 2 and client is not None:
            client._proc.kill()

    s.job.listeners.append(crash)
    s.raises(bpy.ops.xspecmesh.retopologize, "backend")
    assert "Cube_retopo" not in bpy.data.objects
    partial = bpy.data.objects["Cube_retopo (partial)"]
    assert len(partial.data.polygons) > 0 and s.stats(partial)["state"] == "failed"
    assert s.job.ACTIVE is None
    s.job.listeners.clear()  # Blender is fine and the next job starts a fresh backend …
    starting = []
    s.job.listeners.append(lambda run: starting.append(run.starting))
    s.settings.max_faces = 4
    s.activate(src)
    bpy.ops.xspecmesh.retopologize()
    assert len(bpy.data.objects["Cube_retopo"].data.polygons) > 0
    assert starting[0] and not starting[-1]  # … in the background: the run steps (the UI draws) while it loads


def scenario_cancel_while_starting(s: Session):
    bpy = s.bpy
    s.service.stop()
    s.cube()
    names = {o.name for o in bpy.data.objects}
    s.job.listeners.append(lambda run: bpy.ops.xspecmesh.cancel() if run.starting else None)
    bpy.ops.xspecmesh.retopologize()  # a warning, not an error
    s.no_leftovers(names)
    assert s.job.LAST.outcomes[0].state == "not run"
    s.job.listeners.clear()
    bpy.ops.xspecmesh.retopologize()  # the start that was under way is reused
    assert len(bpy.data.objects["Cube_retopo"].data.polygons) > 0


def scenario_unregister_stops_backend(s: Session):
    bpy = s.bpy
    if s.service.current() is None:
        bpy.ops.xspecmesh.test_backend()
    proc = s.service.current()._proc
    bpy.ops.preferences.addon_disable(module=MODULE)
    assert proc.poll() is not None, "the backend outlived the add-on"
    assert not hasattr(bpy.types.Scene, "xspecmesh")
    bpy.ops.preferences.addon_enable(module=MODULE)


def _install_module(s: Session):
    return sys.modules[f"{MODULE}.blender.install"]


def scenario_install_needs_online_access(s: Session):
    bpy = s.bpy
    bpy.context.preferences.system.use_online_access = False
    assert not bpy.app.online_access
    folder = _install_module(s).folder(create=False)
    s.raises(bpy.ops.xspecmesh.install_backend, "Allow Online Access")
    assert not (folder / "env").exists() and not (folder / "env.partial").exists()
    assert _check_draw(s, None, owner=s.prefs).count("operator") == 3


def scenario_install_backend(s: Session):
    """(Run by test_install_backend_end_to_end only.) The real install, from the registry, then hello."""
    bpy = s.bpy
    bpy.context.preferences.system.use_online_access = True
    assert bpy.app.online_access
    s.prefs.torch_requirement = "torch==2.13.0"  # on this machine: a CPU build on disk
    s.prefs.torch_index_url = "https://pypi.org/simple"
    assert bpy.ops.xspecmesh.install_backend() == {"FINISHED"}
    run = _install_module(s).CURRENT
    print("\n".join(list(run.log)[-10:]), f"\ninstall took {run.seconds:.0f} s", flush=True)
    assert run.state == "done" and run.python.is_file()
    assert Path(os.environ["BLENDER_USER_RESOURCES"]) in run.env.parents and (run.env / "xspecmesh-ready.json").is_file()
    assert s.prefs.backend_python == str(run.python)
    client = s.service.current()
    assert client.python == str(run.python) and client.hello["heads"] == 4, client.hello
    s.cube()
    s.settings.max_faces = 4
    assert bpy.ops.xspecmesh.retopologize() == {"FINISHED"}
    assert s.job.LAST.outcomes[0].state == "done" and s.job.LAST.outcomes[0].faces > 0


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zip", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--backend-python", required=True, help="a Python with torch and xspecmesh")
    parser.add_argument("--blender-version", required=True, help="the version this Python's bpy must be")
    args = parser.parse_args(argv)
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(Path(args.tmp) / "blender_user"))
    import bpy

    results: dict = {}
    out = Path(args.results)
    try:
        bpy.ops.extensions.package_install_files(filepath=args.zip, repo="user_default", enable_on_install=True)
        session = Session(args)
    except Exception:
        error = "installing the extension failed:\n" + traceback.format_exc()
        out.write_text(json.dumps({name: {"ok": False, "error": error} for name in SCENARIOS}))
        return 1
    for name in args.only or SCENARIOS:
        t = time.perf_counter()
        try:
            session.reset()
            if name == "install_backend":  # reset() points Backend Python at the test's; the install replaces it
                session.prefs.backend_python = ""
            globals()[f"scenario_{name}"](session)
            results[name] = {"ok": True}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t, 2)
        print(f"scenario {name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s)",
              flush=True)
        out.write_text(json.dumps(results, indent=1))
    session.service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))

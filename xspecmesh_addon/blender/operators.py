"""Operators: thin wrappers that check the context, start a `job.Run` and report how it ended.

Interactive (`invoke` with a window): a modal timer steps the run once per UI tick and Esc cancels. Headless or from
a script (`execute`): the same run is stepped in a blocking loop, because timers never fire in background mode.
"""
from __future__ import annotations

import bpy
from bpy.props import StringProperty

from ..core import service
from ..core.sampling import CONVERTIBLE_TYPES, SamplingError
from . import job, preferences

TICK = 0.05  # seconds between UI updates while a job runs
_timers: list = []  # (window manager, timer) of the modal run, so a file load can remove them


def _active_source(context):
    obj = context.active_object
    return obj if obj is not None and obj.type in CONVERTIBLE_TYPES else None


def _redraw(context) -> None:
    screen = getattr(context, "screen", None)
    for area in screen.areas if screen else ():
        if area.type == "VIEW_3D":
            area.tag_redraw()


def stop_modal() -> None:
    """Remove the modal timer (a file load or unregister ends the run under it)."""
    while _timers:
        wm, timer = _timers.pop()
        try:
            wm.event_timer_remove(timer)
        except (ReferenceError, RuntimeError, ValueError):
            pass


class _RunOperator:
    """Shared driving of a `job.Run`; subclasses implement `make_run` and `conclude`."""

    def make_run(self, context) -> "job.Run | None":
        raise NotImplementedError

    def conclude(self, context, run: "job.Run") -> set:
        raise NotImplementedError

    def _launch(self, context):
        try:
            run = self.make_run(context)
        except service.BackendUnavailable as exc:
            self.report({"ERROR"}, str(exc))
            return None
        if run is not None:
            job.ACTIVE = run
        return run

    def execute(self, context):
        run = self._launch(context)
        if run is None:
            return {"CANCELLED"}
        try:
            run.run_blocking(TICK)
        finally:
            job.ACTIVE, job.LAST = None, run
        return self.conclude(context, run)

    def invoke(self, context, event):
        if bpy.app.background or context.window is None:
            return self.execute(context)
        return self.start_modal(context)

    def start_modal(self, context):
        run = self._launch(context)
        if run is None:
            return {"CANCELLED"}
        self._run = run
        wm = context.window_manager
        self._timer = wm.event_timer_add(TICK, window=context.window)
        _timers.append((wm, self._timer))
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        run = self._run
        if job.ACTIVE is not run:  # aborted from outside (file load, unregister)
            self._end(context)
            return {"CANCELLED"}
        if event.type == "ESC" and event.value == "PRESS":
            run.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":  # (events do not say which timer fired; another timer only steps us sooner)
            return {"PASS_THROUGH"}
        try:
            run.step(0.0)
        except Exception as exc:  # never leave a modal handler spinning on a broken run
            run.abort()
            self._end(context)
            job.ACTIVE, job.LAST = None, run
            self.report({"ERROR"}, f"XSpecMesh stopped: {exc}")
            return {"CANCELLED"}
        _redraw(context)
        if not run.finished:
            return {"RUNNING_MODAL"}
        self._end(context)
        job.ACTIVE, job.LAST = None, run
        return self.conclude(context, run)

    def _end(self, context) -> None:
        entry = (context.window_manager, self._timer)
        if entry in _timers:
            _timers.remove(entry)
            context.window_manager.event_timer_remove(self._timer)
        _redraw(context)


class XSPECMESH_OT_retopologize(_RunOperator, bpy.types.Operator):
    """Generate an artist-like triangle mesh for the active object with the XSpecMesh model"""

    bl_idname = "xspecmesh.retopologize"
    bl_label = "Retopologize"
    bl_options = {"UNDO"}  # no REGISTER: "Adjust Last Operation" would silently rerun a whole generation

    @classmethod
    def poll(cls, context):
        if job.ACTIVE is not None:
            cls.poll_message_set("A retopology job is running")
            return False
        if _active_source(context) is None:
            obj = context.active_object
            cls.poll_message_set("No active object" if obj is None else
                                 f"'{obj.name}' is a {obj.type.lower()}, not a mesh or an object that converts to one")
            return False
        return True

    def make_run(self, context):
        source = _active_source(context)
        settings = context.scene.xspecmesh
        try:
            prepared = job.sample_ahead(source, settings.seed, settings.object_axes)
        except SamplingError as exc:
            self.report({"ERROR"}, str(exc))
            return None
        startup = preferences.begin_backend(context)
        return job.Run([source.name], settings.to_request(), startup, lambda src: list(src.users_collection),
                       hide_source=settings.hide_source, object_axes=settings.object_axes, prepared=prepared)

    def conclude(self, context, run):
        if not run.outcomes:  # aborted from outside (another file was loaded)
            self.report({"WARNING"}, "Retopology stopped")
            return {"CANCELLED"}
        outcome = run.outcomes[0]
        if outcome.state == "done":
            result = bpy.data.objects.get(outcome.result)
            context.view_layer.update()
            if result is not None and result.name in context.view_layer.objects:
                for obj in context.selected_objects:
                    obj.select_set(False)
                result.select_set(True)
                context.view_layer.objects.active = result
            self.report({"INFO"}, outcome.summary().replace(f"{outcome.source}:", f"{outcome.result}:", 1))
            return {"FINISHED"}
        if outcome.state in ("cancelled", "not run"):  # not run: cancelled while the backend was starting
            kept = f"partial result kept as '{outcome.result}' ({outcome.faces} faces)" if outcome.result else \
                "no faces were generated"
            self.report({"WARNING"}, f"Cancelled: {kept}")
        else:
            kept = f"; partial result kept as '{outcome.result}'" if outcome.result else ""
            self.report({"ERROR"}, f"{outcome.message}{kept}")
        return {"FINISHED"} if outcome.result else {"CANCELLED"}


class XSPECMESH_OT_retopologize_collection(_RunOperator, bpy.types.Operator):
    """Retopologize every mesh of a collection through one backend; results go to '<collection> (retopo)'"""

    bl_idname = "xspecmesh.retopologize_collection"
    bl_label = "Retopologize Collection"
    bl_options = {"UNDO"}  # no REGISTER: "Adjust Last Operation" would silently rerun a whole generation

    collection: StringProperty(name="Collection", description="Name of the collection (empty: the active one)")

    @classmethod
    def poll(cls, context):
        if job.ACTIVE is not None:
            cls.poll_message_set("A retopology job is running")
            return False
        return True

    def make_run(self, context):
        name = self.collection or context.collection.name
        source = bpy.data.collections.get(name) or (
            context.scene.collection if name == context.scene.collection.name else None)
        if source is None:
            self.report({"ERROR"}, f"No collection named '{name}'")
            return None
        objects = sorted((o.name for o in source.all_objects if o.type in CONVERTIBLE_TYPES))
        if not objects:
            self.report({"ERROR"}, f"Collection '{name}' has no mesh objects")
            return None
        startup = preferences.begin_backend(context)
        target = bpy.data.collections.new(f"{name} (retopo)")
        context.scene.collection.children.link(target)
        self._target = target.name
        settings = context.scene.xspecmesh
        return job.Run(objects, settings.to_request(), startup, lambda src: [target],
                       hide_source=settings.hide_source, object_axes=settings.object_axes, batch=True)

    def conclude(self, context, run):
        for outcome in run.outcomes:
            self.report({"INFO"} if outcome.state == "done" else {"WARNING"}, outcome.summary())
        made = [o for o in run.outcomes if o.result]
        target = bpy.data.collections.get(self._target)
        if target is not None and not made:
            bpy.data.collections.remove(target)
        done = sum(o.state == "done" for o in run.outcomes)
        seconds = sum(o.seconds for o in run.outcomes)
        text = f"{done} of {len(run.outcomes)} objects retopologized in {seconds:.1f} s"
        text += f" into '{self._target}'" if made else ""
        if done == 0 and not run.cancel_requested:
            self.report({"ERROR"}, text)
        else:
            self.report({"INFO"} if done == len(run.outcomes) else {"WARNING"}, text)
        return {"FINISHED"} if made else {"CANCELLED"}


class XSPECMESH_OT_cancel(bpy.types.Operator):
    """Stop the running retopology (in a collection, every object still running; finished ones stay)"""

    bl_idname = "xspecmesh.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return job.ACTIVE is not None

    def execute(self, context):
        job.ACTIVE.cancel()
        return {"FINISHED"}


class _BackendOperator:
    """An operator on the backend process itself: not while a job uses it."""

    @classmethod
    def poll(cls, context):
        return job.ACTIVE is None


class XSPECMESH_OT_test_backend(_BackendOperator, bpy.types.Operator):
    """Start the backend with the current preferences and report its versions and device"""

    bl_idname = "xspecmesh.test_backend"
    bl_label = "Test Backend"

    def execute(self, context):
        service.stop()
        try:
            preferences.ensure_backend(context)
        except service.BackendUnavailable as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Backend ready: {service.describe()}")
        return {"FINISHED"}


class XSPECMESH_OT_stop_backend(_BackendOperator, bpy.types.Operator):
    """Stop the backend process (it starts again with the next job)"""

    bl_idname = "xspecmesh.stop_backend"
    bl_label = "Stop Backend"

    def execute(self, context):
        running = service.current() is not None
        service.stop()
        self.report({"INFO"}, "Backend stopped" if running else "Backend was not running")
        return {"FINISHED"}

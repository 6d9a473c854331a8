"""Install Backend (Preferences › Add-ons › XSpecMesh): the operators and the preferences' install section around
core/installer.py.

Nothing is downloaded until the button is pressed, and only with Blender's online access allowed. The environment
lives in the extension's user directory (`<extensions>/.user/<repo>/xspecmesh/backend/env`), which survives
extension updates. Interactive: pip runs in a thread and a timer redraws the preferences with its progress line and
log; headless (`bpy.app.background`, where timers never fire) the operator runs the install to its end. On success
Backend Python points at the new environment and the backend is started once, as Test Backend does.
"""
from __future__ import annotations

from pathlib import Path

import bpy

from ..core import installer, service
from . import ADDON_ID, job, preferences  # (preferences imports this module too: both only use the other later)

POLL = 0.5  # seconds between progress redraws
LOG_SHOWN = 8  # log lines the preferences show
CURRENT: "installer.Install | None" = None  # the install under way, or the last one (its log stays on show)


def folder(create: bool = True) -> Path:
    """Where Install Backend puts the environment."""
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, path="backend", create=create))
    except ValueError:  # loaded as a legacy add-on (e.g. from a checkout), not as an extension
        return Path(bpy.utils.user_resource("CONFIG", path="xspecmesh/backend", create=create))


def offline_reason() -> str | None:
    if bpy.app.online_access:
        return None
    return ("Online access is off, so nothing can be downloaded: allow it in Preferences › System › Network › Allow "
            "Online Access (and do not start Blender with --offline-mode), then press Install Backend again")


def _redraw_preferences() -> None:
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()


def _conclude(context) -> tuple[str, str]:
    """After the install: point Backend Python at it and start the backend once. Returns (report type, message)."""
    run = CURRENT
    if run.state != "done":
        return ("WARNING" if run.state == "cancelled" else "ERROR"), run.message
    prefs = preferences.get(context)
    prefs.backend_python = str(run.python)
    service.stop()
    try:
        preferences.ensure_backend(context)
    except service.BackendUnavailable as exc:
        run.status = f"Installed in {run.env}, but Test Backend failed: {exc}"
        return "ERROR", run.status
    run.status = f"Backend installed and running: {service.describe()}"
    return "INFO", run.status


def _watch():
    _redraw_preferences()
    if CURRENT is None or not CURRENT.finished:
        return POLL if CURRENT is not None else None
    print(f"XSpecMesh: {_conclude(bpy.context)[1]}")
    _redraw_preferences()
    return None


class XSPECMESH_OT_install_backend(bpy.types.Operator):
    """Create a private Python environment for the backend and install PyTorch and the backend's packages into it with
    pip (downloads about 1 GB for the CPU build, several GB for CUDA)"""

    bl_idname = "xspecmesh.install_backend"
    bl_label = "Install Backend"

    @classmethod
    def poll(cls, context):
        return (CURRENT is None or CURRENT.finished) and job.ACTIVE is None

    def execute(self, context):
        global CURRENT
        reason = offline_reason()
        if reason:
            self.report({"ERROR"}, reason)
            return {"CANCELLED"}
        prefs = preferences.get(context)
        build, index = installer.torch_index(prefs.torch_build)
        try:
            CURRENT = installer.Install(folder(), torch_requirement=prefs.torch_requirement,
                                        index_url=prefs.torch_index_url.strip() or index)
        except installer.InstallError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        CURRENT.log.append(f"PyTorch build: {build}, from {CURRENT.index_url or 'pip’s configured index'}")
        service.stop()  # the old environment may be replaced
        if bpy.app.background:
            CURRENT.run()
            kind, message = _conclude(context)
            self.report({kind}, message)
            return {"FINISHED"} if kind == "INFO" else {"CANCELLED"}
        CURRENT.start()
        bpy.app.timers.register(_watch, first_interval=POLL)
        self.report({"INFO"}, "Installing the backend: progress in Preferences › Add-ons › XSpecMesh")
        return {"FINISHED"}


class XSPECMESH_OT_cancel_install(bpy.types.Operator):
    """Stop Install Backend; nothing of the unfinished environment is kept"""

    bl_idname = "xspecmesh.cancel_install"
    bl_label = "Cancel Install"

    @classmethod
    def poll(cls, context):
        return CURRENT is not None and not CURRENT.finished

    def execute(self, context):
        CURRENT.cancel()
        return {"FINISHED"}


def stop() -> None:
    """The add-on is being disabled: cancel an install under way (it cleans up after itself) and its timer."""
    if CURRENT is not None and not CURRENT.finished:
        CURRENT.cancel()
    if bpy.app.timers.is_registered(_watch):
        bpy.app.timers.unregister(_watch)


def draw(layout, prefs) -> None:
    """The preferences' install section."""
    box = layout.box()
    box.label(text="Install Backend", icon="IMPORT")
    col = box.column()
    col.use_property_split = True
    col.prop(prefs, "torch_build")
    col.prop(prefs, "torch_requirement")
    col.prop(prefs, "torch_index_url")
    running = CURRENT is not None and not CURRENT.finished
    row = box.row()
    if running:
        row.label(text=CURRENT.status, icon="SORTTIME")
        row.operator("xspecmesh.cancel_install", icon="CANCEL")
    else:
        installed = installer.installed_python(folder(create=False))
        row.operator("xspecmesh.install_backend", text="Reinstall Backend" if installed else "Install Backend",
                     icon="IMPORT")
        box.label(text=f"Installed: {installed}" if installed else "Not installed", icon="INFO")
        if offline_reason():
            box.label(text="Online access is off (Preferences › System › Network)", icon="ERROR")
    if CURRENT is not None:
        if not running:
            box.label(text=CURRENT.status, icon="CHECKMARK" if CURRENT.state == "done" else "ERROR")
        log = box.column(align=True)
        log.scale_y = 0.7
        for line in list(CURRENT.log)[-LOG_SHOWN:]:
            log.label(text=line[:160])

"""XSpecMesh for Blender: retopologize objects with a point-cloud-conditioned mesh transformer, sped up by
multi-head speculative decoding. The model runs in a separate backend process (its own Python with torch);
this add-on only samples the object, streams the request and builds the result. No torch is imported here.
"""
from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from .blender import install, job, operators, panel, preferences, properties
from .core import service

CLASSES = (
    properties.XSpecMeshSettings,
    preferences.XSpecMeshPreferences,
    operators.XSPECMESH_OT_retopologize,
    operators.XSPECMESH_OT_retopologize_collection,
    operators.XSPECMESH_OT_cancel,
    operators.XSPECMESH_OT_test_backend,
    operators.XSPECMESH_OT_stop_backend,
    install.XSPECMESH_OT_install_backend,
    install.XSPECMESH_OT_cancel_install,
    panel.XSPECMESH_PT_main,
)


def _abort_active_run() -> None:
    operators.stop_modal()
    run, job.ACTIVE = job.ACTIVE, None
    if run is not None:
        try:
            run.abort()
        except ReferenceError:  # its objects belonged to the file being replaced
            pass


@persistent
def _on_load_pre(*_args) -> None:
    """Another file is loading: the running job's objects are about to disappear."""
    _abort_active_run()


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    properties.register_scene_property()
    bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    _abort_active_run()
    install.stop()
    service.stop()
    properties.unregister_scene_property()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)

"""View3D › Sidebar › XSpecMesh. Draws only: settings, the Retopologize button, and a running job's progress."""
from __future__ import annotations

import bpy

from ..core import service
from ..core.settings_schema import MAX_HEADS
from . import job


class XSPECMESH_PT_main(bpy.types.Panel):
    bl_label = "XSpecMesh"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "XSpecMesh"

    def draw(self, context):
        layout = self.layout
        run = job.ACTIVE
        if run is None:
            col = layout.column()
            col.scale_y = 2.0
            col.operator("xspecmesh.retopologize", icon="MOD_REMESH")
            row = layout.row()
            op = row.operator("xspecmesh.retopologize_collection", icon="OUTLINER_COLLECTION",
                              text=f"All in '{context.collection.name}'")
            op.collection = context.collection.name
        else:
            self.draw_progress(layout, run)

        settings = context.scene.xspecmesh
        col = layout.column(align=True)
        col.enabled = run is None
        col.use_property_split = True
        col.use_property_decorate = False
        col.row().prop(settings, "mode", expand=True)
        spec = col.column(align=True)
        spec.active = settings.mode == "spec"
        spec.prop(settings, "heads", slider=True)
        cap = service.heads_cap()
        if cap is not None and cap < MAX_HEADS:
            spec.label(text=f"Checkpoint has {cap} heads", icon="INFO")
        spec.prop(settings, "adaptive")
        spec.prop(settings, "accept")
        delta = spec.row()
        delta.active = settings.accept == "threshold"
        delta.prop(settings, "delta", slider=True)
        col.separator()
        col.prop(settings, "max_faces")
        col.prop(settings, "temperature")
        col.prop(settings, "seed")
        col.prop(settings, "candidates")
        col.prop(settings, "fit")
        col.prop(settings, "object_axes")
        col.prop(settings, "hide_source")

    @staticmethod
    def draw_progress(layout, run):
        current = run.job
        box = layout.box()
        if run.batch:
            box.label(text=f"Object {min(len(run.outcomes) + 1, len(run.sources))} of {len(run.sources)}",
                      icon="OUTLINER_COLLECTION")
        if run.starting:
            box.label(text="Starting the backend…", icon="TIME")
        name = current.source_name if current else "…"
        faces = current.faces if current else 0
        box.progress(factor=run.fraction(), type="BAR", text=f"{name}: {faces} faces")
        p = current.progress if current else {}
        scr, tps = p.get("scr"), p.get("tokens_per_second")
        row = box.row()
        row.label(text=f"SCR {scr:.2f}" if isinstance(scr, (int, float)) else "SCR –")
        row.label(text=f"{tps:.0f} tok/s" if isinstance(tps, (int, float)) else "– tok/s")
        col = box.column()
        col.scale_y = 1.5
        stopping = run.batch and run.stop_requested
        col.operator("xspecmesh.cancel", icon="CANCEL", text="Stop Now" if stopping else "Cancel (Esc)")

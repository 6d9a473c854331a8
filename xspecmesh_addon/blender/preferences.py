"""Add-on preferences: which Python runs the backend, which checkpoint, device and precision, and Install Backend."""
from __future__ import annotations

import bpy
from bpy.props import EnumProperty, StringProperty

from ..core import locations, service
from . import ADDON_ID, install, properties


class XSpecMeshPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    backend_python: StringProperty(
        name="Backend Python",
        description="Python interpreter with torch and the xspecmesh package (the project's .venv). Empty: "
        "$XSPECMESH_BACKEND_PYTHON or the checkout's .venv when found",
        subtype="FILE_PATH",
        default=locations.default_backend_python(),
    )
    checkpoint: StringProperty(
        name="Checkpoint",
        description="Model weights (.safetensors). Empty: the checkpoint bundled with the add-on",
        subtype="FILE_PATH",
        default="",
    )
    device: EnumProperty(
        name="Device",
        items=(
            ("auto", "Auto", "CUDA when available, else CPU"),
            ("cpu", "CPU", "Always the CPU"),
            ("cuda", "CUDA", "An NVIDIA GPU (fails when none is available)"),
        ),
        default="auto",
    )
    precision: properties.schema_enum("precision", "Precision")
    torch_build: EnumProperty(
        name="PyTorch Build",
        description="Which PyTorch Install Backend installs",
        items=(
            ("auto", "Auto", "CUDA when an NVIDIA GPU is present (nvidia-smi finds one), else CPU"),
            ("cpu", "CPU", "The CPU build (much smaller download)"),
            ("cuda", "CUDA", "The CUDA build, for an NVIDIA GPU"),
        ),
        default="auto",
    )
    torch_requirement: StringProperty(
        name="PyTorch Version",
        description="pip requirement for torch, e.g. 'torch==2.6.0'. Empty: the backend's own (requirements.txt)",
        default="",
    )
    torch_index_url: StringProperty(
        name="PyTorch Index",
        description="Package index to install torch from. Empty: chosen by PyTorch Build (PyTorch's CPU index, or "
        "pip's configured index for CUDA on Linux)",
        default="",
    )

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        col = layout.column()
        col.prop(self, "backend_python")
        if not self.backend_python and not locations.default_backend_python():
            col.label(text="No backend yet: press Install Backend below, or set a Python that has torch", icon="ERROR")
        col.prop(self, "checkpoint")
        if not self.checkpoint:
            bundled = locations.default_checkpoint()
            col.label(text=f"Using {bundled}" if bundled else "No bundled checkpoint: the backend's default is used",
                      icon="INFO")
        col.prop(self, "device")
        col.prop(self, "precision")
        row = layout.row()
        row.operator("xspecmesh.test_backend", icon="PLAY")
        row.operator("xspecmesh.stop_backend", icon="CANCEL")
        if service.current() is not None:
            layout.label(text=f"Running: {service.describe()}", icon="CHECKMARK")
        install.draw(layout, self)


def get(context=None) -> XSpecMeshPreferences:
    context = context or bpy.context
    return context.preferences.addons[ADDON_ID].preferences


def ensure_backend(context=None):
    """The running backend for the current preferences, waiting for its start (raises service.BackendUnavailable
    with the reason)."""
    prefs = get(context)
    return service.ensure(prefs.backend_python, prefs.checkpoint, prefs.device, prefs.precision)


def begin_backend(context=None):
    """The running backend, or its start in the background (`service.Startup`)."""
    prefs = get(context)
    return service.begin(prefs.backend_python, prefs.checkpoint, prefs.device, prefs.precision)

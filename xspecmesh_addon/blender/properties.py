"""Scene settings (`scene.xspecmesh`): what the panel shows and what becomes the typed request.

Each decode setting's name, default, range and help come from core/settings_schema.py (the backend's schema); the
panel's labels, its soft slider ranges and the three view settings (object_axes, hide_source) are its own.
"""
from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty

from ..core import service
from ..core.request import DecodeRequest
from ..core.settings_schema import SETTINGS, cap_heads

PANEL_MODES = ("spec", "ar")  # naive is the backend's benchmark reference, not offered here


def _help(name: str) -> str:
    text = SETTINGS[name].help
    return text[0].upper() + text[1:]


def _items(name: str, only=None) -> tuple:
    return tuple((c.value, c.label, c.help) for c in SETTINGS[name].choices if only is None or c.value in only)


def schema_enum(name: str, label: str, only=None) -> EnumProperty:
    """An EnumProperty for a schema setting with choices (scene settings and preferences alike)."""
    return EnumProperty(name=label, description=_help(name), items=_items(name, only), default=SETTINGS[name].default)


def _number(name: str, label: str, **extra):
    s = SETTINGS[name]
    kind = IntProperty if s.type is int else FloatProperty
    bounds = {k: v for k, v in (("min", s.min), ("max", s.max)) if v is not None}
    return kind(name=label, description=_help(name), default=s.default, **bounds, **extra)


def _flag(name: str, label: str) -> BoolProperty:
    return BoolProperty(name=label, description=_help(name), default=SETTINGS[name].default)


def _get_heads(self) -> int:
    """Reading `heads` never exceeds what the loaded checkpoint has (known once the backend said hello). Stored as
    an ID property through get/set, which every supported Blender has (`get_transform` exists only from 5.0)."""
    return cap_heads(self.get("heads", SETTINGS["heads"].default), service.heads_cap())


def _set_heads(self, value: int) -> None:
    self["heads"] = value


class XSpecMeshSettings(bpy.types.PropertyGroup):
    mode: schema_enum("mode", "Mode", only=PANEL_MODES)
    delta: _number("delta", "δ", subtype="FACTOR")
    heads: _number("heads", "Heads", get=_get_heads, set=_set_heads)
    adaptive: _flag("adaptive", "Adaptive Heads")
    accept: schema_enum("accept", "Acceptance")
    # 0 stands for the schema's None (no limit): an IntProperty cannot hold None
    max_faces: IntProperty(name="Max Faces", description=_help("max_faces") + " (0: no limit)", default=0, min=0,
                           soft_max=20000)
    temperature: _number("temperature", "Temperature", soft_max=2.0)
    seed: _number("seed", "Seed")
    candidates: _number("candidates", "Candidates")
    fit: _flag("fit", "Fit to Source")
    object_axes: BoolProperty(
        name="Object Axes", description="Read the object in its own axes, leaving out its rotation (the result still "
        "lands where the object is): the shipped model was trained on upright, axis-aligned parts", default=False)
    hide_source: BoolProperty(name="Hide Source", description="Hide the source object once its result is ready",
                              default=False)

    def to_request(self) -> DecodeRequest:
        return DecodeRequest(mode=self.mode, heads=self.heads, adaptive=self.adaptive, delta=self.delta,
                             accept=self.accept, temperature=self.temperature, max_faces=self.max_faces or None,
                             seed=self.seed, candidates=self.candidates, fit=self.fit,
                             heads_cap=service.heads_cap())


def register_scene_property() -> None:
    bpy.types.Scene.xspecmesh = bpy.props.PointerProperty(type=XSpecMeshSettings)


def unregister_scene_property() -> None:
    del bpy.types.Scene.xspecmesh

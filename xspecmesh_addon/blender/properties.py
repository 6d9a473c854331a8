"""Scene settings (`scene.xspecmesh`): what the panel shows and what becomes the typed request."""
from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty

from . import service
from .request import MAX_HEADS, DecodeRequest


def _heads_capped(self, value: int, is_set: bool) -> int:
    """Reading `heads` never exceeds what the loaded checkpoint has (known once the backend said hello)."""
    cap = service.heads_cap() or MAX_HEADS
    return max(1, min(value, cap, MAX_HEADS))


class XSpecMeshSettings(bpy.types.PropertyGroup):
    mode: EnumProperty(
        name="Mode",
        items=(
            ("spec", "XSpecMesh", "Speculative decoding: heads draft several tokens, the backbone verifies them at once"),
            ("ar", "AR", "Plain auto-regressive decoding, one token per step (the reference for speed)"),
        ),
        default="spec",
    )
    delta: FloatProperty(
        name="δ", description="Acceptance threshold: a drafted token is kept while the backbone's probability of it "
        "exceeds δ (the paper uses 0.5)", default=0.5, min=0.0, max=1.0, subtype="FACTOR")
    heads: IntProperty(
        name="Heads", description="Drafting heads D (tokens proposed per step), capped by the checkpoint's heads",
        default=4, min=1, max=MAX_HEADS, get_transform=_heads_capped)
    adaptive: BoolProperty(
        name="Adaptive Heads", description="Choose each step's number of drafts (0 up to Heads) from the acceptance "
        "and step cost measured so far, so weak heads never make decoding much slower than AR", default=False)
    accept: EnumProperty(
        name="Acceptance",
        items=(
            ("threshold", "Threshold", "Keep drafted tokens while p > δ (the paper's rule)"),
            ("exact", "Exact", "Accept with probability p: the same distribution as plain sampling"),
            ("greedy", "Greedy", "Accept when the token is the backbone's argmax (deterministic)"),
            ("topk", "Top-K", "Accept when the token is among the backbone's top-K"),
        ),
        default="threshold",
    )
    max_faces: IntProperty(name="Max Faces", description="Stop after this many faces", default=5000, min=1,
                           soft_max=20000)
    temperature: FloatProperty(name="Temperature", description="Sampling temperature (0: always the likeliest "
                               "token)", default=0.5, min=0.0, soft_max=2.0)
    seed: IntProperty(name="Seed", description="Random seed for sampling the surface and decoding", default=0, min=0)
    fit: BoolProperty(
        name="Fit to Source", description="Once the mesh is complete, move its vertices onto the source surface "
        "(faces and connectivity stay as generated), as Shrinkwrap would; the model places vertices on a coarse grid",
        default=True)
    object_axes: BoolProperty(
        name="Object Axes", description="Read the object in its own axes, leaving out its rotation (the result still "
        "lands where the object is): the shipped model was trained on upright, axis-aligned parts", default=False)
    hide_source: BoolProperty(name="Hide Source", description="Hide the source object once its result is ready",
                              default=False)

    def to_request(self) -> DecodeRequest:
        return DecodeRequest.build(mode=self.mode, heads=self.heads, adaptive=self.adaptive, delta=self.delta,
                                   accept=self.accept, temperature=self.temperature, max_faces=self.max_faces,
                                   seed=self.seed, fit=self.fit, heads_cap=service.heads_cap())


def register_scene_property() -> None:
    bpy.types.Scene.xspecmesh = bpy.props.PointerProperty(type=XSpecMeshSettings)


def unregister_scene_property() -> None:
    del bpy.types.Scene.xspecmesh

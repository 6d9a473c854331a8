"""The decode settings, declared once: each setting's name, type, default, range and help text (standard library only).

Canonical file: backend/xspecmesh/decoding/settings_schema.py. The Blender add-on ships a byte-identical copy as
`xspecmesh_addon/core/settings_schema.py` (tests/test_settings_schema.py fails when they differ; fix with
`cp backend/xspecmesh/decoding/settings_schema.py xspecmesh_addon/core/settings_schema.py`). No package imports here.
Derived from it: the backend's `DecodeSettings` (defaults and checks, hence the server's request parsing), the CLI's
`generate` options and `bench`'s defaults, the add-on's scene properties, request and `precision` preference.

Decisions, one behaviour on every path:
- `fit` is on by default: a user retopologizing an object expects the result on its surface (the model places
  vertices on a 128-level grid); `generate --no-fit` or the panel's checkbox turns it off. Benchmarks never fit.
- `max_faces` has no limit by default (None; the panel's 0): the model ends the mesh itself and `max_tokens` bounds it.
- `seed` is 0 .. 2**31 - 1, what Blender's integer properties hold, so a seed from the CLI can be typed into the panel.
- `candidates` > 1 decodes that many samples of one object in one batch and keeps one (closed, then nearest the
  input points: `Engine.stream_batch`); the others are dropped, so only the kept one's faces are streamed.
- A value outside its range is refused with one message naming the setting, never silently clamped (the panel's
  fields cannot leave the range). The one adjustment: more heads than the checkpoint has are lowered to its count
  (`cap_heads`), so the same settings work with any checkpoint.
- `precision` (the weights') defaults to auto, the backend's own: the `--precision` it was started with (the
  add-on's Precision preference); a request naming another makes the backend load the checkpoint at it too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_HEADS = 8  # the most drafting heads any decoder uses (its verification needs that many positions)


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    help: str


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # bool, int, float or str (str settings take one of `choices`)
    default: object
    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False  # the range is (min, max]
    optional: bool = False  # None is allowed (no limit)
    choices: tuple[Choice, ...] = ()

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(c.value for c in self.choices)

    def check(self, value):
        """The value converted to this setting's type; ValueError with a message naming the setting when it is not
        one (wrong type, outside the range, not a choice)."""
        if value is None and self.optional:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false")
            return value
        if self.type is str:
            if value not in self.values:
                raise ValueError(f"{self.name} must be one of {', '.join(self.values)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer past a float's range (JSON allows any number of digits)
            finite = False
        if not finite:
            raise ValueError(f"{self.name} must be a finite number")
        if self.type is int:
            if value != int(value):
                raise ValueError(f"{self.name} must be an integer")
            value = int(value)
        else:
            value = float(value)
        low_ok = self.min is None or (value > self.min if self.min_exclusive else value >= self.min)
        if not (low_ok and (self.max is None or value <= self.max)):
            raise ValueError(f"{self.name} must be {self.range_text()}, not {value}")
        return value

    def range_text(self) -> str:
        lo, hi = (f"{v:g}" if self.type is float else str(v) for v in (self.min, self.max))
        if self.max is None:
            return f"at least {lo}"
        return f"in ({lo}, {hi}]" if self.min_exclusive else f"between {lo} and {hi}"


DECODE = (
    Setting("mode", str, "spec", "decoding: spec (XSpecMesh speculative), ar (plain auto-regressive) or naive (the "
            "published code's AR loop, a benchmark reference)", choices=(
                Choice("spec", "XSpecMesh", "Speculative decoding: heads draft several tokens, the backbone verifies "
                       "them at once"),
                Choice("ar", "AR", "Plain auto-regressive decoding, one token per step (the reference for speed)"),
                Choice("naive", "Naive AR", "The published code's auto-regressive loop (a benchmark reference)"))),
    Setting("heads", int, 4, "drafting heads D (tokens proposed per step), capped by the checkpoint's heads",
            min=1, max=MAX_HEADS),
    Setting("adaptive", bool, False, "choose each step's number of drafts (0 up to heads) from the acceptance and step "
            "cost measured so far, so weak heads never make decoding much slower than AR"),
    Setting("tree", bool, True, "also verify the heads' second choice for the first drafted token where they doubt "
            "the first (below 0.7), kept when their first choice is rejected (a draft tree of two branches; one more "
            "position in such a verification)"),
    Setting("confidence", float, 0.4, "end a step's drafts after one the heads give less than this probability "
            "(such drafts are rarely accepted, and drafting past them costs; 0: always draft heads tokens)",
            min=0.0, max=1.0),
    Setting("delta", float, 0.5, "threshold rule: a drafted token is kept while the backbone's probability of it "
            "exceeds delta (the paper uses 0.5)", min=0.0, max=1.0),
    Setting("accept", str, "threshold", "acceptance rule for drafted tokens", choices=(
        Choice("threshold", "Threshold", "Keep drafted tokens while p > delta (the paper's rule)"),
        Choice("exact", "Exact", "Accept with probability p: the same distribution as plain sampling"),
        Choice("greedy", "Greedy", "Accept when the token is the backbone's argmax (deterministic)"),
        Choice("topk", "Top-K", "Accept when the token is among the backbone's top-K"))),
    Setting("topk_accept", int, 5, "K of the topk acceptance rule", min=1, max=1000),
    Setting("temperature", float, 0.5, "sampling temperature (0: always the likeliest token)", min=0.0, max=10.0),
    Setting("top_k", int, 50, "sample among the k likeliest tokens (0: all)", min=0),
    Setting("top_p", float, 0.95, "sample within this much probability mass (nucleus)", min=0.0, max=1.0,
            min_exclusive=True),
    Setting("max_tokens", int, 10000, "stop after this many tokens", min=1, max=100000),
    Setting("max_faces", int, None, "stop once this many faces are complete (default: no limit)", min=1,
            optional=True),
    Setting("seed", int, 0, "random seed for sampling the surface and decoding", min=0, max=2**31 - 1),
    Setting("candidates", int, 1, "decode this many meshes at once (seeds seed, seed + 1, ...) and keep the best: "
            "closed first, then nearest the source's surface; its faces arrive when all are done", min=1, max=16),
    Setting("precision", str, "auto", "weight precision of the decoder and drafter; auto: the backend's own "
            "(its --precision: bf16 on a CUDA GPU that supports it, int8 on a CPU when the checkpoint passed the int8 "
            "quality check, else fp32)", choices=(
                Choice("auto", "Auto", "The backend's own: bf16 on a capable CUDA GPU, int8 on a CPU for a checkpoint "
                       "that passed the int8 check, else fp32"),
                Choice("fp32", "FP32", "Full precision"),
                Choice("int8", "INT8", "8-bit weights (CPU only)"),
                Choice("bf16", "BF16", "bfloat16 weights"))),
    Setting("fit", bool, True, "once the mesh is complete, move its vertices onto the source surface (faces and "
            "connectivity stay as generated), as Shrinkwrap would; the model places vertices on a coarse grid"),
)

SETTINGS = {s.name: s for s in DECODE}


def defaults() -> dict:
    """Every decode setting's default (what a `generate` request without settings decodes with)."""
    return {s.name: s.default for s in DECODE}


def check(values: dict) -> dict:
    """The decode settings `values` (a mapping of some of them) checked and completed with the defaults."""
    if not isinstance(values, dict):
        raise ValueError("settings must be an object")
    unknown = sorted(set(values) - {s.name for s in DECODE})
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(map(str, unknown))}")
    return {s.name: s.check(values[s.name]) if s.name in values else s.default for s in DECODE}


def cap_heads(heads: int, checkpoint_heads: int | None = None) -> int:
    """`heads` within 1 .. MAX_HEADS and the checkpoint's own count (when known and not zero)."""
    return max(1, min(int(heads), MAX_HEADS, checkpoint_heads or MAX_HEADS))

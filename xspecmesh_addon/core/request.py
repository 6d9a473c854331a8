"""The decode settings of one request, typed and checked (bpy-free).

The panel's scene settings become a `DecodeRequest`; its `settings()` dict is exactly what the backend's `generate`
message carries. Values are clamped here, once, so every path (modal, headless, batch) sends the same thing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MODES = ("ar", "spec")
ACCEPT_RULES = ("threshold", "exact", "greedy", "topk")
MAX_HEADS = 8


def _clamp(value, lo, hi):
    return max(lo, min(hi, value))


@dataclass(frozen=True)
class DecodeRequest:
    mode: str = "spec"  # "ar": plain auto-regressive decoding; "spec": XSpecMesh speculative decoding
    heads: int = 4  # D drafting heads (the paper's best speed at D = 4)
    adaptive: bool = False  # let the backend pick each step's D in 0..heads from measured acceptance and cost
    delta: float = 0.5  # threshold acceptance: keep a drafted token while p_backbone > delta
    accept: str = "threshold"  # threshold | exact | greedy | topk
    temperature: float = 0.5  # BPT's default
    top_k: int = 50
    top_p: float = 0.95
    max_tokens: int = 10000
    max_faces: int = 5000
    seed: int = 0
    fit: bool = True  # move the finished mesh's vertices onto the source surface (backend: xspecmesh/geometry/fit.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.accept not in ACCEPT_RULES:
            raise ValueError(f"accept must be one of {ACCEPT_RULES}, not {self.accept!r}")

    @classmethod
    def build(cls, *, heads_cap: int | None = None, **values) -> "DecodeRequest":
        """Clamp every value to its valid range; `heads_cap` is the checkpoint's number of heads once known."""
        v = {**asdict(cls()), **values}
        cap = MAX_HEADS if not heads_cap else _clamp(int(heads_cap), 1, MAX_HEADS)
        v["heads"] = _clamp(int(v["heads"]), 1, cap)
        v["adaptive"], v["fit"] = bool(v["adaptive"]), bool(v["fit"])
        v["delta"] = _clamp(float(v["delta"]), 0.0, 1.0)
        v["temperature"] = _clamp(float(v["temperature"]), 0.0, 10.0)
        v["top_k"] = max(0, int(v["top_k"]))
        v["top_p"] = _clamp(float(v["top_p"]), 1e-3, 1.0)
        v["max_tokens"] = _clamp(int(v["max_tokens"]), 1, 100_000)
        v["max_faces"] = max(1, int(v["max_faces"]))
        v["seed"] = int(v["seed"]) & 0x7FFFFFFF
        return cls(**v)

    def settings(self) -> dict:
        """The backend's settings dict (the protocol's `generate.settings`)."""
        return asdict(self)

"""The decode settings of one request, typed and checked (bpy-free).

The panel's scene settings become a `DecodeRequest`; its `settings()` dict is exactly what the backend's `generate`
message carries. Every value is checked against settings_schema.py (the backend's own schema, shipped here as a
copy), so a bad value is refused with the backend's message before anything is sent; the heads are lowered to the
checkpoint's count once the backend said how many it has.
"""
from __future__ import annotations

from .settings_schema import cap_heads, check

# What a request carries: every decode setting but topk_accept, tree and confidence, which the panel does not offer (the
# backend's defaults), and precision, a preference the backend is started with (`serve --precision`; a request's auto means that
# one).
REQUEST_SETTINGS = ("mode", "heads", "adaptive", "delta", "accept", "temperature", "top_k", "top_p", "max_tokens",
                    "max_faces", "seed", "candidates", "fit")


class DecodeRequest:
    """`DecodeRequest(heads=3, heads_cap=4)`: the settings given, the schema's defaults for the rest; ValueError
    names a bad or unknown one. Read the values as attributes (`request.seed`)."""

    def __init__(self, *, heads_cap: int | None = None, **values):
        unknown = sorted(set(values) - set(REQUEST_SETTINGS))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        checked = check(values)
        checked["heads"] = cap_heads(checked["heads"], heads_cap)
        self._values = {name: checked[name] for name in REQUEST_SETTINGS}

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __eq__(self, other) -> bool:
        return isinstance(other, DecodeRequest) and self._values == other._values

    def __repr__(self) -> str:
        return f"DecodeRequest({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def capped(self, heads_cap: int | None) -> "DecodeRequest":
        """The same request with its heads lowered to the checkpoint's count (unchanged while that is unknown)."""
        return DecodeRequest(heads_cap=heads_cap, **self._values)

    def settings(self) -> dict:
        """The backend's settings dict (the protocol's `generate.settings`)."""
        return dict(self._values)

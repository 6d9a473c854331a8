"""The backend protocol: one JSON object per line between the Blender add-on and `xspecmesh serve`.

Standard library only, and the same file serves both sides: this copy in `backend/xspecmesh/serving/` is
canonical, the add-on ships a byte-identical copy as `xspecmesh_addon/core/protocol.py` (tests/test_protocol.py fails
when they differ; fix with `cp backend/xspecmesh/serving/protocol.py xspecmesh_addon/core/protocol.py`). No
package-absolute imports here.

Requests (add-on → backend):
    {"type": "generate", "id": "a1", "points": "<base64 of little-endian float32 N×6>", "count": N,
     "settings": {"mode": "spec", "heads": 4, "delta": 0.5, "accept": "threshold", ...}}
        optional "more": true — more generate requests follow at once (a collection): the backend starts no new
        work until a request without it arrives (or stdin ends), so it can decode them together
    {"type": "cancel", "id": "a1"}      also removes a queued request; an id that is unknown (already done) is ignored
    {"type": "shutdown"}                 cancels the running and queued requests, then the backend exits

Replies (backend → add-on); every reply carries "id" (null when no request is concerned):
    {"type": "hello", "id": null, "protocol": 1, "version": ..., "torch": ..., "device": ..., "checkpoint": ...,
     "heads": ..., "drafter": "cross" | "mlp" | "eagle" | "grounded" | null}
    {"type": "progress", "id": "a1", "tokens": ..., "steps": ..., "scr": ..., "faces": ..., "tokens_per_second": ...}
    {"type": "faces", "id": "a1", "triangles": [[[x, y, z], [x, y, z], [x, y, z]], ...]}   normalized frame
    {"type": "done", "id": "a1", "cancelled": false, "stats": {...}}
        with settings {"fit": true}, when the mesh ended at EOS (not cut at a limit, not cancelled) and the fit
        worked, also "fitted": every triangle sent, in the same order and frame (normalized), moved onto the input
        surface (xspecmesh/geometry/fit.py); the add-on builds its final mesh from those. Otherwise the stats say
        why not ("fit_skipped" or "fit_error") and the triangles sent stand. stats["complete"]: the decoder ended
        at EOS, not at a face or token limit; stats["stalled"]: it was stopped in a loop that made no face
    {"type": "error", "id": "a1" or null, "message": "..."}

A request is answered by zero or more progress/faces lines and then exactly one `done` or `error`. Requests start in the
order they arrive. A backend started with `--batch B` (B > 1, the default 8) decodes the queued requests that share
their settings (all but seed, max_tokens, max_faces and fit) together, B at a time (a waiting one takes the place of one
that finished; in naive mode they go in rounds of B): their lines interleave, each request's own lines keep
their order, and under greedy decoding each request gets the tokens it would get alone, up to floating-point rounding
(CPU fp32 runs a different kernel for one row and for several).
End of stdin lets the queued requests finish, then the backend exits.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import sys

PROTOCOL_VERSION = 1
MIN_POINTS = 512
MAX_POINTS = 200_000
POINT_BYTES = 6 * 4  # xyz + normal, float32
MAX_ID_LENGTH = 128
REQUEST_TYPES = ("generate", "cancel", "shutdown")
REPLY_TYPES = ("hello", "progress", "faces", "done", "error")
PROGRESS_KEYS = ("tokens", "steps", "scr", "faces", "tokens_per_second", "seconds")


class ProtocolError(ValueError):
    """A line that breaks the protocol; `request_id` is the offending request's id when it could be read."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


# ---------------------------------------------------------------------------------------------------- lines


def encode(msg: dict) -> bytes:
    """One message as one compact UTF-8 line, newline included. NaN/inf are refused (they are not JSON)."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def decode(line: bytes | str) -> dict:
    """One line → a message object with a string `type`; anything else raises ProtocolError."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"line is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        msg = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"line is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(msg).__name__}")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError('a message needs a string "type"', _readable_id(msg))
    return msg


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _readable_id(msg: dict) -> str | None:
    rid = msg.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LENGTH else None


# ---------------------------------------------------------------------------------------------------- points


def encode_points(points: bytes | bytearray | memoryview, count: int) -> str:
    """float32 N×6 (native order; raw bytes or any buffer of 4-byte floats) → base64 of the little-endian bytes."""
    view = memoryview(points)
    if view.itemsize != 1 and view.format not in ("f", "<f", "=f"):
        raise ProtocolError(f"points must be float32, got a buffer of format {view.format!r}")
    raw = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    if raw.nbytes != count * POINT_BYTES:
        raise ProtocolError(f"points hold {raw.nbytes} bytes, but count {count} needs {count * POINT_BYTES}")
    if sys.byteorder == "big":  # the wire is little-endian
        import array

        swapped = array.array("f", raw.tobytes())
        swapped.byteswap()
        raw = memoryview(swapped).cast("B")
    return base64.b64encode(raw).decode("ascii")


def decode_points(text: str, count: int, request_id: str | None = None) -> bytes:
    """base64 text → little-endian float32 bytes, checked against `count` points."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f'"points" is not valid base64 ({exc})', request_id) from None
    if len(raw) != count * POINT_BYTES:
        have = len(raw) / POINT_BYTES
        raise ProtocolError(f'"points" holds {have:g} points ({len(raw)} bytes), but "count" says {count}',
                            request_id)
    return raw


# ---------------------------------------------------------------------------------------------------- requests


def generate(request_id: str, points: bytes | bytearray | memoryview, count: int, settings: dict,
             more: bool = False) -> dict:
    msg = {"type": "generate", "id": request_id, "points": encode_points(points, count), "count": count,
           "settings": dict(settings)}
    if more:
        msg["more"] = True
    _check_generate(msg)
    return msg


def cancel(request_id: str) -> dict:
    return {"type": "cancel", "id": _check_id(request_id)}


def shutdown() -> dict:
    return {"type": "shutdown", "id": None}


def read_request(line: bytes | str) -> dict:
    """Parse and check one request line. A generate request comes back as a new dict whose `points` are the
    decoded little-endian float32 bytes (length checked against `count`); settings are checked by the engine."""
    msg = decode(line)
    kind = msg["type"]
    if kind not in REQUEST_TYPES:
        raise ProtocolError(f'unknown request type {kind[:50]!r}; expected one of {", ".join(REQUEST_TYPES)}',
                            _readable_id(msg))
    if kind == "shutdown":
        return msg
    rid = _check_id(msg.get("id"))
    if kind == "cancel":
        return msg
    _check_generate(msg)
    return {**msg, "points": decode_points(msg["points"], msg["count"], rid)}


def _check_id(rid) -> str:
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LENGTH:
        raise ProtocolError(f'"id" must be a non-empty string of at most {MAX_ID_LENGTH} characters, got '
                            f"{_describe(rid)}")
    return rid


def _check_generate(msg: dict) -> None:
    rid = _check_id(msg.get("id"))
    count = msg.get("count")
    if not _is_int(count):
        raise ProtocolError(f'"count" must be an integer, got {_describe(count)}', rid)
    if not MIN_POINTS <= count <= MAX_POINTS:
        raise ProtocolError(f'"count" must be between {MIN_POINTS} and {MAX_POINTS} points, got {count}', rid)
    if not isinstance(msg.get("points"), str):
        raise ProtocolError(f'"points" must be a base64 string, got {_describe(msg.get("points"))}', rid)
    if not isinstance(msg.get("more", False), bool):
        raise ProtocolError(f'"more" must be true or false, got {_describe(msg.get("more"))}', rid)
    settings = msg.get("settings", {})
    if not isinstance(settings, dict):
        raise ProtocolError(f'"settings" must be an object, got {_describe(settings)}', rid)
    try:
        encode(settings)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f'"settings" must be plain JSON: {exc}', rid) from None


# ---------------------------------------------------------------------------------------------------- replies


def hello(info: dict) -> dict:
    extra = {k: v for k, v in _plain(info).items() if k not in ("type", "id", "protocol")}
    return {"type": "hello", "id": None, "protocol": PROTOCOL_VERSION, **extra}


def progress(request_id: str, stats: dict) -> dict:
    return {"type": "progress", "id": request_id, **{k: _plain(stats.get(k)) for k in PROGRESS_KEYS}}


def faces(request_id: str, triangles: list) -> dict:
    return {"type": "faces", "id": request_id, "triangles": triangles}


def done(request_id: str, stats: dict, cancelled: bool = False, fitted: list | None = None) -> dict:
    msg = {"type": "done", "id": request_id, "cancelled": bool(cancelled), "stats": _plain(stats)}
    return msg if fitted is None else msg | {"fitted": fitted}


def error(request_id: str | None, message: str) -> dict:
    return {"type": "error", "id": request_id, "message": str(message)}


def validate_reply(msg: dict) -> dict:
    """Check a reply's shape (what the add-on relies on); returns it or raises ProtocolError."""
    kind = msg.get("type")
    if kind not in REPLY_TYPES:
        raise ProtocolError(f"unknown reply type {str(kind)[:50]!r}")
    rid = msg.get("id", "missing")
    if not (rid is None or isinstance(rid, str)):
        raise ProtocolError(f'reply "id" must be a string or null, got {_describe(rid)}')
    if kind == "hello" and msg.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"backend speaks protocol {msg.get('protocol')!r}, this add-on {PROTOCOL_VERSION}")
    if kind in ("progress", "faces", "done") and not isinstance(rid, str):
        raise ProtocolError(f'a {kind} reply needs the request "id"')
    if kind == "faces" and not _is_triangle_list(msg.get("triangles")):
        raise ProtocolError('"triangles" must be a list of [[x, y, z], [x, y, z], [x, y, z]]')
    if kind == "done" and "fitted" in msg and not _is_triangle_list(msg["fitted"]):
        raise ProtocolError('"fitted" must be a list of [[x, y, z], [x, y, z], [x, y, z]]')
    if kind == "done" and not (isinstance(msg.get("cancelled"), bool) and isinstance(msg.get("stats"), dict)):
        raise ProtocolError('a done reply needs a boolean "cancelled" and a "stats" object')
    if kind == "error" and not isinstance(msg.get("message"), str):
        raise ProtocolError('an error reply needs a string "message"')
    return msg


# ---------------------------------------------------------------------------------------------------- helpers


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_triangle_list(tris) -> bool:
    return isinstance(tris, list) and all(
        isinstance(t, list) and len(t) == 3 and all(
            isinstance(v, list) and len(v) == 3 and all(_is_number(c) for c in v) for v in t) for t in tris)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _describe(x) -> str:
    text = json.dumps(x, default=repr) if not isinstance(x, str) else repr(x)
    return f"{type(x).__name__} {text[:40]}"


def _plain(x):
    """Stats → plain JSON values: numbers from numpy/torch scalars, non-finite floats → null, tuples → lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float) or hasattr(x, "item"):
        x = x.item() if hasattr(x, "item") else x
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        return _plain(x)
    return str(x)

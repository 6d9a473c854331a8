"""One settings schema: the backend, the CLI and the add-on take each decode setting's default and range from
xspecmesh/decoding/settings_schema.py (the add-on's scene properties are checked against it in Blender, in
tests/test_blender_addon.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from addon_modules import addon_module

from xspecmesh.cli import build_parser
from xspecmesh.decoding import settings_schema as schema
from xspecmesh.decoding.engine import DecodeSettings
from xspecmesh.errors import SettingsError

ROOT = Path(__file__).resolve().parents[1]


def test_addon_copy_is_byte_identical():
    canonical = (ROOT / "backend/xspecmesh/decoding/settings_schema.py").read_bytes()
    assert (ROOT / "xspecmesh_addon/core/settings_schema.py").read_bytes() == canonical, (
        "xspecmesh_addon/core/settings_schema.py differs from the canonical one; run: "
        "cp backend/xspecmesh/decoding/settings_schema.py xspecmesh_addon/core/settings_schema.py")


def test_backend_settings_are_the_schemas():
    fields = dataclasses.fields(DecodeSettings)
    assert [f.name for f in fields] == [s.name for s in schema.DECODE]
    assert {f.name: f.default for f in fields} == schema.defaults()
    assert dataclasses.asdict(DecodeSettings.from_dict({})) == schema.defaults()


def cli_defaults(command: str, *extra: str) -> dict:
    return vars(build_parser().parse_args([command, *extra]))


def test_generate_options_are_the_schemas():
    args = cli_defaults("generate", "in.obj", "-o", "out.obj")
    assert {s.name: args[s.name] for s in schema.DECODE} == schema.defaults()
    args = cli_defaults("generate", "in.obj", "-o", "out.obj", "--no-fit", "--adaptive", "--max-faces", "7")
    assert (args["fit"], args["adaptive"], args["max_faces"]) == (False, True, 7)


def test_bench_defaults_are_the_schemas():
    args = cli_defaults("bench")
    d = schema.defaults()
    assert (args["heads"], args["delta"], args["accept"]) == ([d["heads"]], [d["delta"]], [d["accept"]])


@pytest.mark.parametrize("name,bad", [
    ("heads", 0), ("heads", schema.MAX_HEADS + 1), ("heads", 2.5), ("delta", 1.01), ("delta", float("nan")),
    ("temperature", -0.1), ("top_p", 0.0), ("top_k", -1), ("max_tokens", 0), ("max_faces", 0), ("seed", -1),
    ("seed", 2**31), ("fit", 1), ("adaptive", "yes"), ("mode", "fast"), ("accept", None), ("topk_accept", 0),
    ("precision", "fp16"),
])
def test_out_of_range_values_are_refused_everywhere(name, bad):
    """Backend (server and CLI parse through DecodeSettings.from_dict) and add-on request refuse the same values."""
    setting = schema.SETTINGS[name]
    with pytest.raises(ValueError, match=name):
        setting.check(bad)
    with pytest.raises(SettingsError, match=name):
        DecodeSettings.from_dict({name: bad})
    if name in addon_module("core.request").REQUEST_SETTINGS:
        with pytest.raises(ValueError, match=name):
            addon_module("core.request").DecodeRequest(**{name: bad})


def test_range_ends_and_conversions():
    assert schema.SETTINGS["heads"].check(8.0) == 8 and isinstance(schema.SETTINGS["heads"].check(8.0), int)
    assert schema.SETTINGS["top_p"].check(1) == 1.0 and schema.SETTINGS["seed"].check(2**31 - 1) == 2**31 - 1
    assert schema.SETTINGS["max_faces"].check(None) is None
    assert schema.check({"heads": 2})["heads"] == 2
    with pytest.raises(ValueError, match="unknown setting"):
        schema.check({"bogus": 1})


def test_heads_cap_is_one_rule():
    assert schema.cap_heads(8, 4) == 4 and schema.cap_heads(3, 4) == 3
    assert schema.cap_heads(99, None) == schema.MAX_HEADS and schema.cap_heads(5, 0) == 5
    assert DecodeSettings.from_dict({"heads": 8}, max_heads=2).heads == 2
    assert DecodeSettings.from_dict({"heads": 8, "mode": "ar"}, max_heads=2).heads == 8  # AR uses no heads


def test_precision_is_the_models():
    from xspecmesh.model import precision

    s = schema.SETTINGS["precision"]
    assert s.values == precision.PRECISIONS == ("auto", "fp32", "int8", "bf16") and s.default == "auto"
    assert cli_defaults("generate", "in.obj", "-o", "out.obj")["precision"] == cli_defaults("bench")["precision"] \
        == s.default

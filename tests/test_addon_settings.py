"""Bpy-free add-on settings: the typed request, backend locations, readable backend errors (no Blender needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from addon_modules import addon_module





request = addon_module("core.request")
locations = addon_module("core.locations")
service = addon_module("core.service")


def test_request_defaults_are_the_papers():
    r = request.DecodeRequest()
    assert (r.mode, r.heads, r.delta, r.accept, r.temperature) == ("spec", 4, 0.5, "threshold", 0.5)


def test_request_settings_are_what_the_backend_accepts():
    from xspecmesh.decoding.engine import DecodeSettings

    settings = request.DecodeRequest(mode="ar", heads=3, delta=0.25, accept="exact", seed=9, adaptive=True,
                                     candidates=4, fit=False).settings()
    assert set(settings) == {"mode", "heads", "adaptive", "delta", "accept", "temperature", "top_k", "top_p",
                             "max_tokens", "max_faces", "seed", "candidates", "fit"}
    assert settings["mode"] == "ar" and settings["heads"] == 3 and settings["delta"] == 0.25
    assert settings["adaptive"] is True and settings["fit"] is False and request.DecodeRequest().fit is True
    json.dumps(settings, allow_nan=False)
    assert DecodeSettings.from_dict(settings).adaptive  # the backend takes every field as sent
    assert DecodeSettings.from_dict(settings).candidates == 4
    assert DecodeSettings.from_dict(request.DecodeRequest().settings()).fit


def test_request_refuses_out_of_range_values_and_caps_heads():
    for bad in ({"delta": 1.5}, {"temperature": -1}, {"max_faces": 0}, {"top_p": 0}, {"seed": -1}, {"heads": 9},
                {"seed": 2**31}, {"fit": 1}, {"delta": float("nan")}, {"topk_accept": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            request.DecodeRequest(**bad)
    assert request.DecodeRequest(heads=8, heads_cap=6).heads == 6
    assert request.DecodeRequest(heads=8).capped(3).heads == 3
    assert request.DecodeRequest(heads=5, heads_cap=None).heads == 5
    assert request.DecodeRequest(max_faces=None).max_faces is None and request.DecodeRequest(seed=2**31 - 1).seed


def test_request_refuses_unknown_choices_and_settings():
    with pytest.raises(ValueError, match="mode"):
        request.DecodeRequest(mode="fast")
    with pytest.raises(ValueError, match="accept"):
        request.DecodeRequest(accept="maybe")
    with pytest.raises(ValueError, match="bogus"):
        request.DecodeRequest(bogus=1)


def _checkout(tmp_path: Path, with_venv: bool) -> Path:
    root = tmp_path / "repo"
    (root / "backend" / "xspecmesh" / "weights").mkdir(parents=True)
    (root / "xspecmesh_addon").mkdir()
    if with_venv:
        py = locations.venv_python(root)
        py.parent.mkdir(parents=True)
        py.write_text("")
    return root


def test_locations_from_a_checkout(tmp_path):
    root = _checkout(tmp_path, with_venv=True)
    addon = root / "xspecmesh_addon"
    assert locations.default_backend_python(addon, environ={}) == str(locations.venv_python(root))
    assert locations.default_backend_python(addon, environ={"XSPECMESH_BACKEND_PYTHON": "/x/py"}) == "/x/py"
    assert locations.backend_path(addon) == str(root / "backend")
    assert locations.default_checkpoint(addon) is None
    ckpt = root / "backend" / "xspecmesh" / "weights" / "default.safetensors"
    ckpt.write_bytes(b"")
    assert locations.default_checkpoint(addon) == str(ckpt)


def test_locations_from_an_installed_zip(tmp_path):
    root = _checkout(tmp_path, with_venv=True)
    installed = tmp_path / "extensions" / "xspecmesh"
    (installed / "backend" / "xspecmesh").mkdir(parents=True)
    assert locations.default_backend_python(installed, environ={}) == ""  # nothing recorded: the user sets it
    (installed / "build_info.json").write_text(json.dumps({"checkout": str(root)}))
    assert locations.default_backend_python(installed, environ={}) == str(locations.venv_python(root))
    assert locations.backend_path(installed) == str(installed / "backend")  # the bundled copy wins


def test_locations_without_a_venv(tmp_path):
    root = _checkout(tmp_path, with_venv=False)
    assert locations.default_backend_python(root / "xspecmesh_addon", environ={}) == ""


def test_readable_backend_errors():
    tail = ('backend failed to start: backend exited unexpectedly (code 1):   File "x.py", line 3\n'
            "ModuleNotFoundError: No module named 'torch'")
    text = service.readable(tail, "/usr/bin/python3")
    assert text.startswith("The backend Python /usr/bin/python3 has no 'torch' module") and "\n" not in text
    died = service.readable("backend exited unexpectedly (code -9): xspecmesh serve: ready")
    assert "stopped unexpectedly (code -9)" in died
    assert service.readable("first line\nsecond") == "first line"


def test_missing_backend_python_is_explained(monkeypatch):
    monkeypatch.setattr(locations, "default_backend_python", lambda *a, **k: "")
    with pytest.raises(service.BackendUnavailable, match="Backend Python"):
        service.configuration("", "", "auto")

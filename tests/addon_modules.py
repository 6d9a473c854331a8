"""Import the add-on's bpy-free modules (`addon_module("core.client")` is xspecmesh_addon/core/client.py, relative
imports included) without its bpy-needing __init__, for the tests that run without Blender."""
from __future__ import annotations

import sys
import types
from pathlib import Path

ADDON = Path(__file__).resolve().parents[1] / "xspecmesh_addon"


def addon_module(name: str):
    if "_xsm_addon" not in sys.modules:
        pkg = types.ModuleType("_xsm_addon")
        pkg.__path__ = [str(ADDON)]
        sys.modules["_xsm_addon"] = pkg
    return __import__(f"_xsm_addon.{name}", fromlist=["_"])

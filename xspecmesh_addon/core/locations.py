"""Where the backend lives: its Python interpreter, its package source, its checkpoint (bpy-free).

The add-on runs either from a checkout (`<repo>/xspecmesh_addon/`, e.g. symlinked into Blender's add-on folder) or
installed from the extension zip, which bundles the backend source as `backend/xspecmesh/` next to this file and
records the checkout it was built from in `build_info.json`. Defaults, first match wins:

- backend Python: `$XSPECMESH_BACKEND_PYTHON`; the checkout's `.venv` Python (this file's checkout, else the one
  recorded at build time) when it exists; else empty and the user sets it in the preferences.
- backend source: the bundled `backend/` folder, else the checkout's `backend/`.
- checkpoint: the bundled `backend/xspecmesh/weights/default.safetensors` when it exists; else the backend decides.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENV_PYTHON = "XSPECMESH_BACKEND_PYTHON"
ADDON_DIR = Path(__file__).resolve().parents[1]  # xspecmesh_addon/ (this file is in its core/)
BUILD_INFO = "build_info.json"
CHECKPOINT_RELPATH = Path("xspecmesh") / "weights" / "default.safetensors"


def env_python(env: Path) -> Path:
    """The interpreter of the virtual environment in `env`."""
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_python(root: Path) -> Path:
    return env_python(root / ".venv")


def build_info(addon_dir: Path = ADDON_DIR) -> dict:
    try:
        return json.loads((addon_dir / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def checkouts(addon_dir: Path = ADDON_DIR) -> list[Path]:
    """Checkouts this add-on may belong to: its own parent when it sits in one, then the recorded build source."""
    found = []
    if (addon_dir.parent / "backend" / "xspecmesh").is_dir():
        found.append(addon_dir.parent)
    recorded = build_info(addon_dir).get("checkout")
    if recorded and (Path(recorded) / "backend" / "xspecmesh").is_dir():
        found.append(Path(recorded))
    return found


def default_backend_python(addon_dir: Path = ADDON_DIR, environ=os.environ) -> str:
    if environ.get(ENV_PYTHON):
        return environ[ENV_PYTHON]
    for root in checkouts(addon_dir):
        if venv_python(root).is_file():
            return str(venv_python(root))
    return ""


def backend_path(addon_dir: Path = ADDON_DIR) -> str | None:
    """The folder that holds the `xspecmesh` package, for the backend's import path."""
    if (addon_dir / "backend" / "xspecmesh").is_dir():
        return str(addon_dir / "backend")
    for root in checkouts(addon_dir)[:1]:
        return str(root / "backend")
    return None


def default_checkpoint(addon_dir: Path = ADDON_DIR) -> str | None:
    source = backend_path(addon_dir)
    if source and (Path(source) / CHECKPOINT_RELPATH).is_file():
        return str(Path(source) / CHECKPOINT_RELPATH)
    return None

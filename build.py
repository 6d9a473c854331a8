#!/usr/bin/env python3
"""One entry point for set-up, tests, the demo and the Blender extension zip.

    python3 build.py demo     # set up .venv, build the extension, run the main job in headless Blender
    python3 build.py test     # set up .venv and run the test suite
    python3 build.py setup    # only create/refresh .venv (and .venv-bpy42, .venv-bpy45: Blender 4.2/4.5 LTS)
    python3 build.py          # build dist/xspecmesh-<version>.zip

Standard library only: it runs with the system Python 3.11 before anything is installed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# On our machines torch 2.13.0 is a CPU build on disk; anything unpinned downloads a multi-GB CUDA build.
TORCH_PIN = "torch==2.13.0"
# Blender's LTS releases, each tested from its own venv (.venv-bpy42, ...) next to .venv's bpy 5.0 (pyproject.toml's
# `blender` extra); the oldest is the manifest's blender_version_min. Only bpy and numpy: the backend those Blenders
# start runs in .venv.
BLENDER_LTS = {"42": "bpy==4.2.23", "45": "bpy==4.5.15"}


def venv_python(venv: Path = VENV) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def setup() -> Path:
    """Create .venv when missing and (re)install the package when pyproject.toml changed."""
    py = venv_python()
    if not py.exists():
        run([sys.executable, "-m", "venv", VENV])
    stamp = VENV / ".xspecmesh-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_PIN.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return py
    extras = "test,blender" if sys.version_info[:2] == (3, 11) else "test"
    run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([py, "-m", "pip", "install", "-q", TORCH_PIN, "numpy<2"])
    run([py, "-m", "pip", "install", "-q", "-e", f".[{extras}]", TORCH_PIN, "numpy<2"], cwd=ROOT)
    stamp.write_text(want)
    return py


def blender_venv(tag: str) -> Path:
    return ROOT / f".venv-bpy{tag}"


def setup_blender_lts() -> None:
    """Create each .venv-bpyNN when missing (bpy wheels exist for Python 3.11 only)."""
    if sys.version_info[:2] != (3, 11):
        print("build.py: Blender LTS venvs need Python 3.11 (bpy's); their tests are skipped", flush=True)
        return
    for tag, spec in BLENDER_LTS.items():
        venv = blender_venv(tag)
        stamp = venv / ".xspecmesh-installed"
        if stamp.exists() and stamp.read_text() == spec:
            continue
        run([sys.executable, "-m", "venv", "--clear", venv])
        run([venv_python(venv), "-m", "pip", "install", "-q", spec, "numpy<2"])
        stamp.write_text(spec)


def test(args: list[str]) -> int:
    py = setup()
    setup_blender_lts()
    return subprocess.call([str(py), "-m", "pytest", "-q", *args], cwd=ROOT)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "zip"
    if cmd == "setup":
        setup()
        setup_blender_lts()
        return 0
    if cmd == "test":
        return test(argv[1:])
    if cmd in ("zip", "demo"):
        py = setup()
        return subprocess.call([str(py), str(ROOT / "tools" / f"{cmd}.py"), *argv[1:]], cwd=ROOT)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

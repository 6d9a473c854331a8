"""Install Backend's bpy-free part (xspecmesh_addon/core/installer.py) with real venvs and a real pip: the torch
build choice, the message when no index answers, cancelling, and that only a finished install is marked ready. The
whole install inside Blender, from the registry, is tests/test_blender_addon.py::test_install_backend_end_to_end."""
from __future__ import annotations

import time
from pathlib import Path

from addon_modules import addon_module

installer = addon_module("core.installer")
ROOT = Path(__file__).resolve().parents[1]
BACKEND = str(ROOT / "backend")


def test_torch_build_choice():
    assert installer.torch_index("cpu", "linux") == ("cpu", installer.CPU_INDEX)
    assert installer.torch_index("cuda", "linux") == ("cuda", None)  # PyPI's Linux torch is the CUDA build
    assert installer.torch_index("cuda", "win32") == ("cuda", installer.CUDA_INDEX_WINDOWS)
    assert installer.torch_index("auto", "linux", gpu=lambda: True) == ("cuda", None)
    assert installer.torch_index("auto", "win32", gpu=lambda: False) == ("cpu", installer.CPU_INDEX)
    assert installer.torch_index("auto", "darwin", gpu=lambda: True) == ("cpu", None)


def test_torch_requirement_defaults_to_the_backends():
    reqs = installer.requirements_file(BACKEND)
    assert installer.default_torch_requirement(reqs) == "torch>=2.2,<3"
    inst = installer.Install(Path("/nonexistent"), backend=BACKEND)
    assert inst.torch_requirement == "torch>=2.2,<3" and inst.index_url is None


def test_failure_messages():
    offline = ["Collecting torch", "WARNING: Retrying ... NewConnectionError('Failed to establish a new connection')"]
    assert "could not reach a package index" in installer.explain(offline, "PyTorch")
    assert "found no PyTorch" in installer.explain(["ERROR: No matching distribution found for torch"], "PyTorch")
    assert installer.explain(["", "ERROR: disk full", ""], "x").endswith("ERROR: disk full")


def test_unreachable_index_fails_clearly_and_leaves_nothing(tmp_path):
    inst = installer.Install(tmp_path, torch_requirement="torch==1.0.0", index_url="http://127.0.0.1:9/simple",
                             backend=BACKEND)
    assert inst.run() == "failed"
    assert "could not reach a package index" in inst.message, list(inst.log)[-20:]
    assert not (tmp_path / "env").exists() and not (tmp_path / "env.partial").exists()
    assert installer.installed_python(tmp_path) is None


def test_cancel_stops_pip_and_keeps_nothing(tmp_path):
    (tmp_path / "env").mkdir()  # an earlier environment without the marker: never reported as installed
    inst = installer.Install(tmp_path, backend=BACKEND)
    inst.start()
    deadline = time.monotonic() + 60
    while not inst.status.startswith("Step 1") and time.monotonic() < deadline:
        time.sleep(0.01)
    inst.cancel()
    assert inst.wait(60) and inst.state == "cancelled", (inst.state, inst.message)
    assert not (tmp_path / "env.partial").exists() and installer.installed_python(tmp_path) is None

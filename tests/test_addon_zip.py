"""The extension zip: layout, manifest, and Blender's own validator (`blender_ext.py validate` from the bpy package)."""
from __future__ import annotations

import ast
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
try:
    import zip as zip_tool
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return zip_tool.build(tmp_path_factory.mktemp("dist"), with_checkpoint=False)


def test_manifest_fields():
    tomllib = pytest.importorskip("tomllib")
    m = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    assert m["id"] == "xspecmesh" and m["type"] == "add-on"
    assert m["blender_version_min"] == "4.2.0"
    assert m["license"] == ["SPDX:GPL-3.0-or-later"]
    assert len(m["tagline"]) <= 64 and m["tagline"][-1].isalnum()
    assert m["permissions"]["files"] and not m["permissions"]["files"].endswith(".")
    assert m["tags"]
    import xspecmesh

    assert m["version"] == xspecmesh.__version__


def test_zip_layout(package):
    assert package.name == f"xspecmesh-{zip_tool.version()}.zip"
    with zipfile.ZipFile(package) as zf:
        names = set(zf.namelist())
        info = json.loads(zf.read("build_info.json"))
    assert {"blender_manifest.toml", "__init__.py", "core/client.py", "core/protocol.py", "blender/operators.py"} <= names
    assert {"backend/xspecmesh/__init__.py", "backend/xspecmesh/__main__.py", "backend/xspecmesh/cli.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(n.startswith(("xspecmesh_addon/", "tests/", "tools/")) for n in names)
    assert info["checkout"] == str(ROOT) and info["version"] == zip_tool.version()


def test_zip_bundles_the_default_checkpoint_when_present(monkeypatch, tmp_path):
    fake = tmp_path / "default.safetensors"
    fake.write_bytes(b"weights")
    monkeypatch.setattr(zip_tool, "CHECKPOINT", fake)
    names = [name for _, name in zip_tool.entries(with_checkpoint=True)]
    assert "backend/xspecmesh/weights/default.safetensors" in names
    assert "backend/xspecmesh/weights/default.safetensors" not in \
        [name for _, name in zip_tool.entries(with_checkpoint=False)]


def imported(path: Path) -> set[str]:
    """The top-level packages a module imports (its code, not its strings: the installer runs `import torch` in
    the backend's Python)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_add_on_core_never_imports_bpy():
    for path in (ROOT / "xspecmesh_addon" / "core").glob("*.py"):
        assert "bpy" not in imported(path), path.name


def test_add_on_never_imports_torch():
    for path in (ROOT / "xspecmesh_addon").rglob("*.py"):
        assert "torch" not in imported(path), path.name


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy (Blender's validator) is not installed")
def test_blenders_validator_accepts_the_zip(package, tmp_path):
    assert "Success" in zip_tool.validate(package)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "blender_manifest.toml":
                data = data.replace(b'tags = ["Mesh", "Modeling"]', b'tags = ["Mesh", "Retopo Magic"]')
            dst.writestr(item, data)
    with pytest.raises(zip_tool.BuildError, match="Retopo Magic"):
        zip_tool.validate(bad)

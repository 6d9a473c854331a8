"""Build the Blender extension: dist/xspecmesh-<version>.zip (`python3 build.py` runs this with the venv's Python).

Layout inside the zip (what Blender installs as one extension folder):

    blender_manifest.toml          the repo root's manifest
    __init__.py, core/, blender/   the add-on (xspecmesh_addon/), at the root as Blender expects
    build_info.json                version and the checkout it was built from (the add-on finds the .venv there)
    backend/xspecmesh/...          the backend package source, put on the backend's import path by the client
    backend/requirements.txt       the backend's dependencies, which Install Backend pip-installs
    backend/xspecmesh/weights/default.safetensors   the shipped checkpoint, when it exists

The zip is then checked with Blender's own extension tool (`blender_ext.py validate` from the bl_pkg add-on shipped
inside the bpy package), tags included.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "xspecmesh_addon"
BACKEND = ROOT / "backend" / "xspecmesh"
REQUIREMENTS = ROOT / "backend" / "requirements.txt"
MANIFEST = ROOT / "blender_manifest.toml"
CHECKPOINT = BACKEND / "weights" / "default.safetensors"
CHECKPOINT_ARCNAME = "backend/xspecmesh/weights/default.safetensors"
BACKEND_SUFFIXES = {".py", ".json"}


class BuildError(RuntimeError):
    pass


def version() -> str:
    def read(path: Path, key: str) -> str | None:  # a top-level `key = "value"` line (no tomllib on Python 3.10)
        match = re.search(rf'^{key}\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8"), re.M)
        return match.group(1) if match else None

    manifest, package = read(MANIFEST, "version"), read(BACKEND / "__init__.py", "__version__")
    if not manifest or manifest != package:
        raise BuildError(f"blender_manifest.toml says version {manifest}, the xspecmesh package {package}")
    return manifest


def entries(with_checkpoint: bool = True) -> list[tuple[Path, str]]:
    """(source file, path inside the zip), sorted."""
    files = [(MANIFEST, MANIFEST.name)]
    files += [(p, p.relative_to(ADDON).as_posix()) for p in sorted(ADDON.rglob("*.py")) if "__pycache__" not in p.parts]
    files.append((REQUIREMENTS, "backend/requirements.txt"))
    for p in sorted(BACKEND.rglob("*")):
        rel = p.relative_to(BACKEND.parent)
        if p.is_file() and p.suffix in BACKEND_SUFFIXES and "__pycache__" not in rel.parts and p != CHECKPOINT:
            files.append((p, f"backend/{rel.as_posix()}"))
    if with_checkpoint and CHECKPOINT.is_file():
        files.append((CHECKPOINT, CHECKPOINT_ARCNAME))
    return files


def build(out_dir: Path = ROOT / "dist", with_checkpoint: bool = True) -> Path:
    ver = version()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"xspecmesh-{ver}.zip"
    tmp = target.with_suffix(".zip.tmp")
    info = {"version": ver, "checkout": str(ROOT)}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for src, name in entries(with_checkpoint):
            # weights are incompressible: store them
            zf.write(src, name, zipfile.ZIP_STORED if src.suffix == ".safetensors" else zipfile.ZIP_DEFLATED)
        zf.writestr("build_info.json", json.dumps(info, indent=1) + "\n")
    tmp.replace(target)
    return target


def blender_scripts() -> Path | None:
    """`<bpy>/<version>/scripts` of the installed bpy package, found without importing it."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    return found[-1].parents[3] if found else None


def validate(zip_path: Path) -> str:
    """Run Blender's `blender_ext.py validate` on the zip; returns its output, raises BuildError when it fails."""
    scripts = blender_scripts()
    if scripts is None:
        raise BuildError("bpy is not installed in this Python, so Blender's extension validator is not available")
    tool = scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    tags = scripts / "modules" / "_bpy_internal" / "extensions" / "tags.py"
    cmd = [sys.executable, str(tool), "validate", str(zip_path)]
    if tags.is_file():
        cmd.insert(3, f"--valid-tags={tags}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "error" in output.lower():
        raise BuildError(f"Blender's extension validator rejected {zip_path.name}:\n{output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--no-checkpoint", action="store_true", help="leave the default checkpoint out")
    parser.add_argument("--no-validate", action="store_true", help="skip Blender's validator")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, with_checkpoint=not args.no_checkpoint)
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        has_ckpt = any(n.endswith("default.safetensors") for n in names)
        print(f"built {path} ({path.stat().st_size / 1e6:.1f} MB, {len(names)} files, "
              f"{'with' if has_ckpt else 'without'} the default checkpoint)")
        if not args.no_validate:
            print(f"validated: {validate(path) or 'ok'}")
    except BuildError as exc:
        print(f"zip: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collect a small set of real, low-poly evaluation meshes from two Debian packages (no other downloads).

    python tools/fetch_eval_meshes.py [--cache cache/eval] [--max-faces 6000]

Steps: `apt-get download` the packages `libcgal-demo` (CGAL's data meshes, bundled as a tarball) and
`assimp-testmodels` (Assimp's format test models) into CACHE/debs (running `apt-get update` once if apt does not know
them yet), unpack them with `dpkg -x` into CACHE/extract (and the mesh files of tarballs inside them), then read every
.off/.obj/.ply/.stl file with trimesh and keep those that form one usable triangle mesh with 4..--max-faces faces.
Kept meshes are written as OBJ (a format every loader here reads the same way) to CACHE/meshes/<package>__<folder>__
<name>.obj, identical geometry only once; CACHE/meshes/manifest.json lists every file looked at, with the reason a file
was skipped. `xspecmesh bench --meshes CACHE/meshes` then uses them. The cache directory is git-ignored; re-running
reuses the downloaded packages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("libcgal-demo", "assimp-testmodels")
EXTENSIONS = (".off", ".obj", ".ply", ".stl")
MIN_FACES = 4


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def download(packages, debs: Path) -> list[Path]:
    """The .deb of each package in `debs`, downloading what is missing."""
    debs.mkdir(parents=True, exist_ok=True)
    found, updated = [], False
    for name in packages:
        existing = sorted(debs.glob(f"{name}_*.deb"))
        if not existing:
            proc = run(["apt-get", "download", name], cwd=debs)
            if proc.returncode != 0 and not updated:
                print(f"apt-get download {name} failed; running apt-get update", file=sys.stderr)
                upd = run(["apt-get", "update"])
                if upd.returncode != 0:
                    print(f"apt-get update failed: {upd.stderr.strip()[-300:]}", file=sys.stderr)
                updated = True
                proc = run(["apt-get", "download", name], cwd=debs)
            if proc.returncode != 0:
                raise SystemExit(f"cannot download {name}: {proc.stderr.strip()[-300:]}")
            existing = sorted(debs.glob(f"{name}_*.deb"))
        if not existing:
            raise SystemExit(f"apt-get download {name} left no .deb in {debs}")
        found.append(existing[-1])
        print(f"package {existing[-1].name} ({existing[-1].stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return found


def extract(deb: Path, into: Path) -> Path:
    target = into / deb.name.split("_")[0]
    if not target.is_dir():
        tmp = target.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        proc = run(["dpkg", "-x", str(deb), str(tmp)])
        if proc.returncode != 0:
            raise SystemExit(f"dpkg -x {deb.name} failed: {proc.stderr.strip()[-300:]}")
        unpack_archives(tmp)
        tmp.rename(target)
    return target


def unpack_archives(root: Path) -> None:
    """Unpack the mesh files of tarballs inside a package (CGAL ships its data as data.tar.gz), next to them."""
    for archive in sorted(root.rglob("*.tar.gz")):
        dest = archive.parent  # members carry their own top folder (data/...)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(EXTENSIONS)]
            if members:
                tar.extractall(dest, members=members, filter="data")  # the data filter refuses unsafe paths


def read_mesh(path: Path, max_faces: int):
    """(vertices, faces) of one usable triangle mesh, or a reason string."""
    import trimesh

    try:
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # broken test files raise all sorts of errors
        text = str(exc).strip().splitlines()
        mesh = read_polygon_off(path) if path.suffix.lower() == ".off" else None
        if mesh is None:
            return f"unreadable ({text[0][:120] if text else type(exc).__name__})"
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        return "no triangle faces (point cloud, lines or empty)"
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if faces.min() < 0 or faces.max() >= len(verts):
        return "faces reference missing vertices"
    if not np.isfinite(verts).all():
        return "non-finite coordinates"
    mesh = trimesh.Trimesh(verts, faces, process=True)  # weld and drop degenerate faces
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    n = len(mesh.faces)
    if n < MIN_FACES:
        return f"{n} usable faces (< {MIN_FACES})"
    if n > max_faces:
        return f"{n} faces (> {max_faces})"
    extent = np.ptp(mesh.vertices, axis=0)
    if extent.max() <= 0 or not mesh.area > 0:
        return "zero extent or area"
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def read_polygon_off(path: Path):
    """Plain OFF files whose faces mix polygon sizes (trimesh reads only uniform ones), polygons fan-triangulated.
    None when the file does not parse; the header's counts are checked against the file before anything is built
    (a test file claiming billions of vertices must not allocate them)."""
    import trimesh

    if path.stat().st_size > 20_000_000:
        return None
    words = []
    for line in path.read_text(errors="replace").splitlines():
        words.extend(line.split("#", 1)[0].split())
    try:
        if len(words) < 4 or words[0] != "OFF":
            return None
        nv, nf = int(words[1]), int(words[2])
        if not (0 < nv and 0 < nf and 4 + 3 * nv + 4 * nf <= len(words)):
            return None
        verts = np.array(words[4 : 4 + 3 * nv], dtype=np.float64).reshape(nv, 3)
        faces, i = [], 4 + 3 * nv
        for _ in range(nf):
            k = int(words[i])
            if k < 3 or i + 1 + k > len(words):
                return None
            poly = [int(w) for w in words[i + 1 : i + 1 + k]]
            i += 1 + k
            while i < len(words) and "." in words[i]:  # optional per-face colour values
                i += 1
            faces.extend([poly[0], poly[j], poly[j + 1]] for j in range(1, k - 1))
    except (ValueError, IndexError):
        return None
    faces = np.array(faces, np.int64).reshape(-1, 3)
    if faces.min() < 0 or faces.max() >= nv:
        return None
    return trimesh.Trimesh(verts, faces, process=False)


def fingerprint(verts: np.ndarray, faces: np.ndarray) -> str:
    """Same shape up to translation/scale and vertex order -> same key (duplicates across formats)."""
    v = (verts - verts.min(0)) / max(float(np.ptp(verts, axis=0).max()), 1e-12)
    tris = np.sort(np.round(v[faces], 4).reshape(len(faces), -1), axis=0)
    return hashlib.sha1(tris.tobytes()).hexdigest()


def collect(roots: dict[str, Path], out: Path, max_faces: int) -> dict:
    import trimesh

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.obj"):
        old.unlink()
    kept, skipped, seen = [], [], {}
    for package, root in roots.items():
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS):
            rel = path.relative_to(root)
            result = read_mesh(path, max_faces)
            if isinstance(result, str):
                skipped.append({"source": f"{package}/{rel}", "reason": result})
                continue
            verts, faces = result
            key = fingerprint(verts, faces)
            if key in seen:
                skipped.append({"source": f"{package}/{rel}", "reason": f"duplicate of {seen[key]}"})
                continue
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{package}__{rel.parent.name}__{rel.stem}")
            name, n = f"{stem}.obj", 1
            while name in seen.values():
                n += 1
                name = f"{stem}_{n}.obj"
            trimesh.Trimesh(verts, faces, process=False).export(str(out / name))
            seen[key] = name
            kept.append({"file": name, "source": f"{package}/{rel}", "faces": int(len(faces)),
                         "vertices": int(len(verts))})
    manifest = {"packages": list(roots), "max_faces": max_faces, "kept": kept, "skipped": skipped}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "cache" / "eval"), help="cache directory (default cache/eval)")
    ap.add_argument("--max-faces", type=int, default=6000, help="largest mesh kept (default 6000 faces)")
    ap.add_argument("--min-count", type=int, default=20, help="exit with status 1 if fewer meshes are found")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    debs = download(PACKAGES, cache / "debs")
    roots = {deb.name.split("_")[0]: extract(deb, cache / "extract") for deb in debs}
    manifest = collect(roots, cache / "meshes", args.max_faces)
    kept, skipped = manifest["kept"], manifest["skipped"]
    reasons: dict[str, int] = {}
    for s in skipped:
        reason = re.sub(r"\d+", "N", s["reason"].split(" (")[0]) if not s["reason"].startswith("duplicate") \
            else "duplicate"
        reasons[reason] = reasons.get(reason, 0) + 1
    for s in skipped:
        if not s["reason"].startswith("duplicate"):
            print(f"skipped {s['source']}: {s['reason']}", file=sys.stderr)
    faces = [k["faces"] for k in kept]
    by_package = {p: sum(k["source"].startswith(p + "/") for k in kept) for p in roots}
    print(f"kept {len(kept)} meshes in {cache / 'meshes'} "
          f"({', '.join(f'{p}: {n}' for p, n in by_package.items())}; faces "
          f"{min(faces, default=0)}..{max(faces, default=0)}, median {int(np.median(faces)) if faces else 0}); "
          f"skipped {len(skipped)}: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
    return 0 if len(kept) >= args.min_count else 1


if __name__ == "__main__":
    sys.exit(main())

"""`xspecmesh batch`: a folder of meshes in, `_retopo` files out — the same outputs as `generate` per file under greedy
decoding, a bad file logged and skipped, resumable after a kill, sharded by torchrun (two CPU processes, gloo)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh

from xspecmesh.model.checkpoint import write_random_checkpoint

REF = Path(__file__).parent / "data" / "reference" / "meshes"
GREEDY = ("--mode", "spec", "--accept", "greedy", "--temperature", "0", "--max-tokens", "150", "--no-progress")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_random_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", "tiny", heads=4))


def cmd(*args, tool=(sys.executable, "-m", "xspecmesh")):
    return [*tool, *map(str, args)]


def run(*args, **kw):
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return subprocess.run(cmd(*args, **kw), capture_output=True, text=True, env=env, timeout=300)


def tree(root: Path, names=("box", "cone10", "capsule", "icosphere1")) -> list[Path]:
    """Meshes in sub-folders and several formats, plus a corrupt file."""
    files = []
    for i, name in enumerate(names):
        mesh = trimesh.load(REF / f"{name}.obj", force="mesh")
        path = root / ("a" if i % 2 else "b/c") / f"{name}.{('obj', 'ply', 'stl', 'off')[i % 4]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        mesh.export(path)
        files.append(path)
    (root / "b" / "broken.obj").write_text("v 0 0 nonsense\nf 1 2 9\n")
    (root / "notes.txt").write_text("not a mesh")
    return files


def outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*_retopo.*"))}


def test_batch_writes_what_generate_writes_and_lists_the_bad_file(ckpt, tmp_path):
    files = tree(tmp_path / "in")
    r = run("batch", tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", ckpt, "--batch", "3", "--json", *GREEDY)
    assert r.returncode == 1, r.stderr  # one failure
    summary = json.loads(r.stdout)
    assert (summary["objects"], summary["done"], summary["skipped"], summary["failed"]) == (5, 4, 0, 1)
    assert summary["failures"][0]["input"].endswith("broken.obj") and summary["failures"][0]["reason"]
    assert summary["tokens_per_second"] > 0 and summary["mean_scr"] >= 1.0
    got = outputs(tmp_path / "out")
    assert sorted(got) == sorted(str(f.relative_to(tmp_path / "in").with_name(f"{f.stem}_retopo{f.suffix}"))
                                 for f in files)
    for f in files:  # one at a time through `generate`, same settings: the same file
        single = tmp_path / "single" / f"{f.stem}_retopo{f.suffix}"
        single.parent.mkdir(exist_ok=True)
        g = run("generate", f, "-o", single, "--checkpoint", ckpt, *GREEDY[:-1])
        assert g.returncode == 0, g.stderr
        assert got[str(f.relative_to(tmp_path / "in").with_name(single.name))] == single.read_bytes()
    log = [json.loads(line) for line in (tmp_path / "out" / "batch_log.jsonl").read_text().splitlines()]
    assert sorted(e["status"] for e in log) == ["done"] * 4 + ["failed"]
    assert sorted(e["batch"] for e in log if e["status"] == "done") == [3, 3, 3, 3]  # 4 good files, B = 3 slots
    assert all(isinstance(e["stalled"], bool) and isinstance(e["complete"], bool) for e in log if e["status"] == "done")
    assert json.loads((tmp_path / "out" / "batch_summary.json").read_text())["done"] == 4


def test_a_killed_batch_resumes_without_redoing_finished_files(ckpt, tmp_path):
    tree(tmp_path / "in", names=("box", "cone10", "capsule", "icosphere1", "cylinder16", "annulus"))
    args = ("batch", tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", ckpt, "--batch", "1", "--json",
            "--mode", "ar", "--temperature", "0", "--max-tokens", "400", "--no-progress")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not outputs(tmp_path / "out") and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first = outputs(tmp_path / "out")
    assert first, "no output before the kill"
    for name in first:  # whole files only: a mesh that loads
        assert len(trimesh.load(tmp_path / "out" / name, force="mesh").faces) > 0
    r = run(*args)
    summary = json.loads(r.stdout)
    assert summary["skipped"] == len(first) and summary["done"] == 6 - len(first) and summary["failed"] == 1
    again = outputs(tmp_path / "out")
    assert {k: again[k] for k in first} == first and len(again) == 6
    assert not [p for p in (tmp_path / "out").rglob(".*partial*")]


def test_bad_arguments_get_one_message(ckpt, tmp_path):
    r = run("batch", tmp_path / "missing", "-o", tmp_path / "out", "--checkpoint", ckpt)
    assert r.returncode == 2 and r.stderr.startswith("xspecmesh: error:") and "not a folder" in r.stderr
    r = run("batch", tmp_path, "-o", tmp_path / "out", "--checkpoint", ckpt, "--batch", "0")
    assert r.returncode == 2 and "--batch" in r.stderr


def test_torchrun_shards_the_files_over_two_processes(ckpt, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    files = tree(tmp_path / "in")
    r = run("--standalone", "--nnodes", "1", "--nproc-per-node", "2", "-m", "xspecmesh", "batch", tmp_path / "in",
            "-o", tmp_path / "out", "--checkpoint", ckpt, "--batch", "2", "--json", *GREEDY, tool=(str(torchrun),))
    assert r.returncode == 1, r.stderr  # the broken file
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 alone prints it
    assert r.stdout.count('"objects"') == 1
    assert (summary["objects"], summary["done"], summary["failed"], summary["processes"]) == (5, 4, 1, 2)
    assert len(outputs(tmp_path / "out")) == len(files)
    log = [json.loads(line) for line in (tmp_path / "out" / "batch_log.jsonl").read_text().splitlines()]
    assert sorted(e["input"] for e in log) == sorted(str(p) for p in tmp_path.joinpath("in").rglob("*")
                                                     if p.suffix in (".obj", ".ply", ".stl", ".off"))


def test_fit_is_applied_per_object_as_generate_does(ckpt, tmp_path):
    tree(tmp_path / "in", names=("box", "cone10"))
    r = run("batch", tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", ckpt, "--batch", "2", "--fit", *GREEDY)
    assert r.returncode == 1, r.stderr  # the broken file
    log = [json.loads(line) for line in (tmp_path / "out" / "batch_log.jsonl").read_text().splitlines()]
    done = [e for e in log if e["status"] == "done"]
    assert len(done) == 2 and all(any(k.startswith("fit_") for k in e) for e in done)
    for e in done:
        src = Path(e["input"])
        single = tmp_path / f"single_{src.stem}{src.suffix}"
        g = run("generate", src, "-o", single, "--checkpoint", ckpt, "--fit", *GREEDY[:-1])
        assert g.returncode == 0, g.stderr
        assert Path(e["output"]).read_bytes() == single.read_bytes()


def test_a_failing_rank_reports_instead_of_hanging_the_others(ckpt, tmp_path, monkeypatch, capsys):
    """Rank 0 fails (here: no such checkpoint) while rank 1 decodes: rank 0 still joins the gather the other rank
    waits in, prints every rank's error and exits 1. torch.distributed is faked: one process plays rank 0."""
    import torch.distributed as dist

    from xspecmesh.cli import main
    from xspecmesh.serving.batch import Report

    gathers = []

    def all_gather_object(out, obj):
        gathers.append(obj)
        out[:] = [obj, (Report(), None)]

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda backend: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # (the test process keeps its threads)
    tree(tmp_path / "in", names=("box",))
    rc = main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint",
               str(tmp_path / "missing.safetensors"), *GREEDY])
    err = capsys.readouterr().err
    assert rc == 1 and len(gathers) == 1 and gathers[0][0] is None
    assert "xspecmesh: error: rank 0 of 2:" in err and "missing.safetensors" in err

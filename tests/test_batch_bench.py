"""The batch benchmark's engine part on a tiny random checkpoint: structure and token identity, no timings."""
from __future__ import annotations

import numpy as np
import pytest

from xspecmesh.benchmarks import batch_bench
from xspecmesh.decoding.engine import Engine
from xspecmesh.model.checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(str(write_random_checkpoint(tmp_path_factory.mktemp("ck") / "t.safetensors", "tiny", heads=4)),
                       "cpu")


def test_every_batch_size_gives_the_tokens_of_one_at_a_time(engine):
    rng = np.random.default_rng(0)
    points = [rng.normal(size=(200, 6)).astype(np.float32) for _ in range(3)]
    modes = ["ar", "spec", "spec+adaptive"]
    rows = batch_bench.bench_engine(engine, {"p": points}, [1, 2, 3], modes, max_tokens=40, reps=1,
                                    log=lambda m: None)
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for m in modes for b in (1, 2, 3)]
    for r in rows:
        assert r["identical"] and r["objects"] == 3 and r["tokens"] > 0 and 0 < r["occupancy"] <= 1
        assert r["objects_per_minute"] > 0 and r["tokens_per_second"] > 0 and r["scr"] > 0
    assert all(r["speedup"] == 1.0 for r in rows if r["batch"] == 1)
    assert "| p | spec | 3 |" in batch_bench.table(rows)


def test_rows_say_how_slots_were_refilled(engine):
    """AR and spec join (and run once more in rounds when asked); the naive loop only goes in rounds."""
    rng = np.random.default_rng(1)
    points = [rng.normal(size=(200, 6)).astype(np.float32) for _ in range(3)]
    rows = batch_bench.bench_engine(engine, {"p": points}, [1, 2], ["spec", "naive"], max_tokens=20, reps=1,
                                    log=lambda m: None, rounds=[2])
    assert [(r["mode"], r["batch"], r["refill"]) for r in rows] == [
        ("spec", 1, "join"), ("spec", 2, "join"), ("spec", 2, "rounds"), ("naive", 1, "join"), ("naive", 2, "rounds")]
    assert all(r["identical"] and r["objects"] == 3 for r in rows)


def test_the_cli_part_runs_on_procedural_shapes_written_as_files(engine, tmp_path):
    """`--cli` on the procedural set: the shapes go to `xspecmesh batch` as OBJ files; the row has the command's wall
    time, its own summary's seconds and whether the outputs of --batch 1 and --batch N are the same bytes."""
    import json

    out = tmp_path / "bench.json"
    assert batch_bench.main(["--count", "2", "--batch", "1,2", "--modes", "ar", "--max-tokens", "12", "--cli", "2",
                             "--paths-set", "procedural", "--checkpoint", engine.ckpt.path, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["cli"]
    assert row["objects"] == 2 and row["identical"]
    assert 0 < row["summary_seconds_batched"] < row["seconds_batched"]
    assert 0 < row["summary_seconds_one_at_a_time"] < row["seconds_one_at_a_time"]

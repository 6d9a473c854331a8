"""Benchmarks (xspecmesh/benchmarks/bench.py, `xspecmesh bench`): structure of the results on a tiny random checkpoint.
Nothing here asserts a timing."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import trimesh

from xspecmesh.benchmarks import bench, step_cost
from xspecmesh.model.checkpoint import write_random_checkpoint
from xspecmesh.cli import main
from xspecmesh.decoding.engine import Engine
from xspecmesh.training.data import ShapeConfig

ROW_FIELDS = {"mode", "heads", "delta", "accept", "seconds", "speedup", "scr", "cd", "hd", "faces", "failures", "runs",
              "stalled", "tokens_per_second", "cd_10k", "hd_10k", "cpu_seconds", "speedup_cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "tiny", heads=4))


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.load(checkpoint, "cpu")


@pytest.fixture(scope="module")
def inputs(engine):
    return bench.procedural_inputs(2, engine.model.cfg.encoder.num_points)


@pytest.fixture(scope="module")
def result(engine, inputs):
    bad = bench.BenchInput("too-few-points", np.zeros((3, 6), np.float32), inputs[0].reference)
    return bench.run_bench(engine, [*inputs, bad], bench.variants(heads=(2,)), seeds=1, max_tokens=40,
                           progress=False)


def test_variants_cover_every_configuration_once():
    vs = bench.variants(heads=(2, 4), deltas=(0.3, 0.5), accepts=("threshold", "exact"), naive=True)
    assert vs[0] == bench.Variant("ar") and vs[-1] == bench.Variant("naive")
    spec = [v for v in vs if v.mode == "spec"]
    assert len(spec) == 2 * 2 + 2  # δ only varies the threshold rule
    assert all(v.delta is None for v in spec if v.accept == "exact")
    assert len(set(vs)) == len(vs)
    twins = bench.variants(heads=(2,), adaptive=True)
    assert [(v.mode, v.adaptive) for v in twins] == [("ar", False), ("spec", False), ("spec", True)]
    assert twins[2].settings(0, 10).adaptive and twins[2].label == "spec D=2*+tree threshold δ=0.5 c=0.4"
    trees = bench.variants(heads=(2,), trees=(False, True), confidences=(0.0, 0.3))
    assert [(v.tree, v.settings(0, 10).tree, v.settings(0, 10).confidence) for v in trees[1:]] == [
        (False, False, 0.0), (False, False, 0.3), (True, True, 0.0), (True, True, 0.3)]


def test_bench_rows_have_the_documented_fields(result):
    assert {"device", "checkpoint", "rows", "runs"} <= set(result)
    assert [r["mode"] for r in result["rows"]] == ["ar", "spec"]
    for row in result["rows"]:
        assert ROW_FIELDS <= set(row)
        assert row["runs"] == 3
    ar, spec = result["rows"]
    assert ar["speedup"] == 1.0  # the median of AR/AR over the pairs
    assert ar["scr"] == pytest.approx(1.0)
    assert spec["heads"] == 2 and spec["delta"] == 0.5 and spec["accept"] == "threshold"
    assert spec["speedup"] > 0 and 1.0 <= spec["scr"] <= 3.0
    assert len(spec["head_accept_rates"]) == 2
    # pooled from the decoder's own counts of drafts verified and accepted, per head, over the spec runs
    counted = [r for r in result["runs"] if r.get("head_trials")]
    accepts, trials = (np.sum([r[k] for r in counted], 0) for k in ("head_accepts", "head_trials"))
    assert counted and trials[0] > 0
    assert spec["head_accept_rates"] == [pytest.approx(a / t) if t else None for a, t in zip(accepts, trials)]
    # the step's cost in AR steps over the same trials: all of it, and the decoder's three parts within it
    ar_runs = [r for r in result["runs"] if r["label"] == "ar" and r["seconds"] is not None]
    ar_step = sum(r["decode_seconds"] for r in ar_runs) / sum(r["steps"] for r in ar_runs)
    cost = spec["step_cost"]
    assert cost["all"] == pytest.approx(sum(r["decode_seconds"] for r in counted)
                                        / sum(r["steps"] for r in counted) / ar_step)
    assert 0 < cost["draft"] and 0 < cost["verify"] and cost["draft"] + cost["verify"] + cost["other"] <= cost["all"]
    assert "step_cost" not in ar and "SCR / all" in bench.markdown(result)
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN


def test_failures_are_counted_not_dropped(result):
    for row in result["rows"]:
        assert row["failures"] >= 1  # the three-point input cannot be conditioned on
    failed = [r for r in result["runs"] if r["input"] == "too-few-points"]
    assert len(failed) == 2 and all(r["failed"] and "points" in r["error"] for r in failed)


def test_stalled_runs_are_counted(engine, inputs, monkeypatch):
    from xspecmesh.decoding import engine as engine_mod

    monkeypatch.setattr(engine_mod, "STALL_TOKENS", 1)  # every decode stalls at its first token without a face
    out = bench.run_bench(engine, inputs[:1], bench.variants(heads=(2,)), seeds=1, max_tokens=40, progress=False)
    assert all(r["stalled"] for r in out["runs"]) and all(row["stalled"] == row["runs"] for row in out["rows"])


def test_an_empty_generation_is_a_failure(engine, inputs):
    out = bench.run_bench(engine, inputs[:1], bench.variants(heads=(2,)), seeds=1, max_tokens=2, progress=False)
    for row in out["rows"]:  # two tokens cannot make a triangle
        assert row["failures"] == row["runs"] == 1 and row["cd"] is None and row["faces"] == 0


def test_quality_parity_over_seeds(engine, inputs):
    out = bench.run_bench(engine, inputs[:1], bench.variants(heads=(1,)), seeds=3, max_tokens=30, progress=False)
    for row in out["rows"]:
        assert row["runs"] == 3
        assert {"cd_seed_mean", "cd_seed_std", "hd_seed_mean", "hd_seed_std"} <= set(row)
    assert "± " in bench.markdown(out)


def test_markdown_and_plot(result, tmp_path):
    text = bench.markdown(result)
    assert "| mode |" in text and text.count("\n| ar |") == 1
    bench.plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_mesh_directory_inputs(tmp_path):
    trimesh.creation.box().export(tmp_path / "box.obj")
    trimesh.creation.icosphere(1).export(tmp_path / "ball.ply")
    (tmp_path / "broken.obj").write_text("v 0 0 0\n")
    got, skipped = bench.mesh_inputs(tmp_path, None, 64)
    assert sorted(i.name for i in got) == ["ball", "box"]
    assert len(skipped) == 1 and skipped[0].startswith("broken.obj")
    assert all(i.points.shape == (64, 6) and np.abs(i.points[:, :3]).max() <= 0.95 + 1e-6 for i in got)
    assert len(bench.mesh_inputs(tmp_path, 1, 64)[0]) == 1


def test_cli_json(checkpoint):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--checkpoint", checkpoint, "--device", "cpu", "--count", "2", "--max-tokens", "16",
                   "--heads", "1,2", "--json", "--no-progress"])
    assert rc == 0
    data = json.loads(out.getvalue())
    assert data["checkpoint"] == checkpoint and data["device"] == "cpu"
    assert [(r["mode"], r["heads"]) for r in data["rows"]] == [("ar", None), ("spec", 1), ("spec", 2)]
    assert all(ROW_FIELDS <= set(r) for r in data["rows"])


def test_cli_compare_runs_the_same_trials_on_another_checkpoint(checkpoint, tmp_path):
    other = write_random_checkpoint(tmp_path / "other.safetensors", heads=1, seed=3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--checkpoint", checkpoint, "--compare", str(other), "--device", "cpu", "--count", "2",
                   "--max-tokens", "16", "--heads", "1,2", "--json", "--no-progress"])
    assert rc == 0
    data = json.loads(out.getvalue())
    # D=2 is skipped on the one-head checkpoint; every row ran on the same two inputs
    assert [(r["mode"], r["heads"], r["model"]) for r in data["rows"]] == [
        ("ar", None, ""), ("spec", 1, ""), ("spec", 2, ""), ("ar", None, "other"), ("spec", 1, "other")]
    assert all(r["runs"] == 2 for r in data["rows"])
    assert data["compare"] == {"other": str(other)}
    runs = {(r["input"], r["model"]) for r in data["runs"] if r["mode"] == "ar"}
    assert len(runs) == 4
    assert "| ar @other |" in bench.markdown(data)


def test_step_cost_gives_a_ratio_per_d(engine):
    out = step_cost.step_cost(engine, range(1, 7), cache_lengths=(24,), repeats=2, warmup=1, progress=False)
    rows = out["rows"]
    assert [r["heads"] for r in rows] == [1, 2, 3, 4]  # limited to the checkpoint's heads
    for r in rows:
        assert r["cache_length"] == 24 and r["ratio"] > 0
        assert r["oracle_speedup"] == pytest.approx((r["heads"] + 1) / r["ratio"])
    assert "oracle speedup" in step_cost.step_cost_markdown(out)


def test_cli_step_cost_json(checkpoint):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--checkpoint", checkpoint, "--device", "cpu", "--step-cost", "--cache-lengths", "16",
                   "--repeats", "1", "--json", "--no-progress"])
    assert rc == 0
    assert len(json.loads(out.getvalue())["rows"]) == 4


def test_procedural_inputs_follow_the_checkpoints_training_distribution(engine):
    """Without --families / --max-faces the benchmark draws what the checkpoint's metadata says it was trained on."""
    assert ShapeConfig.trained_on(engine.ckpt.meta).axis_aligned is False
    trained = {"families": "box,cone", "max_faces": 60, "axis_aligned": True, "axis_turns": 24}
    shapes = ShapeConfig.trained_on(trained)
    assert (shapes.families, shapes.max_faces) == (("box", "cone"), 60)
    assert (shapes.axis_aligned, shapes.axis_turns) == (True, 24)
    given = ShapeConfig.trained_on(trained, families="torus", max_faces=300)
    assert (given.families, given.max_faces) == (("torus",), 300)


def test_ar_vs_naive_per_batch_same_tokens(checkpoint):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--checkpoint", checkpoint, "--device", "cpu", "--ar-vs-naive", "--batch", "1,3",
                   "--max-tokens", "25", "--seeds", "2", "--json", "--no-progress"])
    assert rc == 0
    data = json.loads(out.getvalue())
    assert [r["batch"] for r in data["rows"]] == [1, 3] and data["trials"] == 2
    for r in data["rows"]:
        assert r["same_tokens"] is True and 0 < r["tokens"] <= 25 * r["batch"]
        assert r["ar_vs_naive"] == pytest.approx(r["ar_tokens_per_second"] / r["naive_tokens_per_second"])
    from xspecmesh.benchmarks.loop_bench import ar_vs_naive_markdown
    assert "| 3 |" in ar_vs_naive_markdown(data)

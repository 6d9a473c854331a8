"""Training stages on the tiny preset: a few steps each (seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import numpy as np
import torch

from xspecmesh.model.checkpoint import load_checkpoint, write_random_checkpoint
from xspecmesh.training.trainer import TrainConfig, Trainer, batches, collate, shape_config
from xspecmesh.training.data import ShapeConfig, validation_pairs
from xspecmesh.errors import SettingsError

FAST = dict(preset="tiny", token_budget=600, max_faces=40, eval_every=0, gen_count=0, save_every=1000, log_every=1,
            warmup=1)


@pytest.fixture(scope="module")
def batch():
    pairs = validation_pairs(4, config=ShapeConfig(max_faces=40), num_points=128)
    return collate(pairs)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_backbone_loss_decreases_and_resume(tmp_path, batch):
    tr = Trainer(TrainConfig(stage="backbone", out=str(tmp_path), steps=12, lr=3e-3, save_every=6, **{
        k: v for k, v in FAST.items() if k != "save_every"}))
    before = tr.loss(*batch)[0].item()
    tr.run()
    after = tr.loss(*batch)[0].item()
    assert after < before - 0.1
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "log.jsonl").exists()
    resumed = Trainer(TrainConfig(stage="backbone", out=str(tmp_path), steps=14, resume=True, **FAST))
    resumed.run()
    assert resumed.start_step == 12 and resumed.step == 14
    w = load_checkpoint(tmp_path / "model.safetensors").model.state_dict()
    assert load_checkpoint(tmp_path / "model.safetensors").meta["step"] == 14 and len(w) > 0


def test_stage1_changes_only_heads(tmp_path, batch):
    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    tr = Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), steps=8, lr=3e-3, num_heads=3,
                             **FAST))
    model_before, heads_before = snapshot(tr.model), snapshot(tr.heads)
    first = tr.loss(*batch)[0].item()
    tr.run()
    assert not changed(model_before, tr.model)
    assert changed(heads_before, tr.heads)
    assert tr.loss(*batch)[0].item() < first
    ck = load_checkpoint(tmp_path / "h" / "model.safetensors")
    assert ck.max_heads == 3
    assert (ck.meta["families"], ck.meta["max_faces"], ck.meta["axis_aligned"]) == (None, 40, False)


def test_own_samples_are_decoded_a_pool_of_micro_batches_at_a_time(tmp_path, monkeypatch):
    """--sample-pool 3: one AR decode serves three micro-batches of own samples, each over its own shapes and cut to
    its own longest sample; a fourth draw decodes the next pool."""
    from xspecmesh.training import trainer as trainer_module

    decoded, seen = [], []
    real_samples = trainer_module.own_samples

    def counting(model, cond, max_tokens, generator=None):
        decoded.append(len(cond))
        return real_samples(model, cond, max_tokens, generator)

    monkeypatch.setattr(trainer_module, "own_samples", counting)
    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    tr = Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), steps=4, num_heads=2,
                             head_type="eagle", self_samples=1.0, sample_pool=3, **FAST))
    real_loss = tr.loss

    def spy(inputs, targets, points, own):
        seen.append((len(inputs), len(points), inputs.shape[1], int((targets >= 0).any(0).nonzero().max()) + 1))
        return real_loss(inputs, targets, points, own)

    monkeypatch.setattr(tr, "loss", spy)
    tr.run()
    assert len(decoded) == 2 and decoded[0] == sum(n for n, _, _, _ in seen[:3])
    assert all(rows == shapes and width == used for rows, shapes, width, used in seen)
    with pytest.raises(SettingsError, match="sample-pool"):
        Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "x"), sample_pool=0, **FAST))
    with pytest.raises(SettingsError, match="teacher-temperature"):
        Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "x"), teacher_temperature=0, **FAST))


def test_training_distribution_is_configured_and_recorded(tmp_path):
    cfg = TrainConfig(stage="backbone", out=str(tmp_path), steps=1, families="box, cone", axis_aligned=True, **FAST)
    assert shape_config(cfg) == ShapeConfig(max_faces=40, families=("box", "cone"), axis_aligned=True)
    Trainer(cfg).run()
    meta = load_checkpoint(tmp_path / "model.safetensors").meta
    assert (meta["families"], meta["axis_aligned"]) == ("box, cone", True)


def test_own_output_heads_start_from_the_backbones_projection(tmp_path, batch):
    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    tr = Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), steps=2, lr=3e-3, num_heads=2,
                             head_own_output=True, **FAST))
    assert not tr.heads.cfg.shared_output
    assert torch.equal(tr.heads.to_logits.weight, tr.model.to_logits.weight)
    tr.run()
    ck = load_checkpoint(tmp_path / "h" / "model.safetensors")
    assert not ck.heads.cfg.shared_output
    assert not torch.equal(ck.heads.to_logits.weight, ck.model.to_logits.weight)  # trained apart from the backbone


def test_stage2_changes_only_lora_and_heads_and_merges_exactly(tmp_path, batch):
    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=2)
    tr = Trainer(TrainConfig(stage="lora", init=str(init), out=str(tmp_path / "l"), steps=6, lr=5e-3, num_heads=2,
                             lora_rank=4, **FAST))
    before, heads_before = snapshot(tr.model), snapshot(tr.heads)
    tr.run()
    diff = changed(before, tr.model)
    assert diff and all("lora_" in k for k in diff)
    assert changed(heads_before, tr.heads)
    inputs, _, points = batch
    tr.model.eval()
    merged, _ = tr.inference_modules()
    with torch.no_grad():
        a, _ = tr.model(inputs, cond=tr.model.encode(points))
        b, _ = merged(inputs, cond=merged.encode(points))
    assert torch.allclose(a, b, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())
    ck = load_checkpoint(tmp_path / "l" / "model.safetensors")  # saved merged: loads as a plain backbone
    with torch.no_grad():
        c, _ = ck.model(inputs, cond=ck.model.encode(points))
    assert torch.allclose(a, c, atol=1e-4)


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from xspecmesh.training.trainer import TrainConfig, Trainer
        tr = Trainer(TrainConfig(stage="backbone", out={str(tmp_path / 'run')!r}, steps=3, **{FAST!r}))
        last = tr.run()
        assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
        save_file({{k: v.contiguous() for k, v in tr.model.state_dict().items()}},
                  {str(tmp_path)!r} + f"/rank{{tr.rank}}.safetensors")
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = write_random_checkpoint(tmp_path / "fresh.safetensors", "tiny", heads=0)
    assert not torch.equal(a["to_logits.weight"], load_checkpoint(fresh).model.to_logits.weight)


def test_axis_rows_name_each_tokens_axis_values():
    from xspecmesh.geometry import tokenizer as tok
    from xspecmesh.training.axis_factors import BLOCK_ROWS, NULL_ROW, axis_rows

    rows = axis_rows(tok.VOCAB_SIZE)
    block, offset = tok.block_offset(np.array([[5, 70, 127], [5, 71, 0]]))
    assert rows[block[0]].tolist() == [0, 8 + 4, 16 + 7]  # levels 5, 70, 127 lie in blocks 0, 4, 7
    assert rows[offset[0]].tolist() == [BLOCK_ROWS + 5, BLOCK_ROWS + 16 + 6, BLOCK_ROWS + 32 + 15]
    assert rows[offset[1]][0] == rows[offset[0]][0] and rows[offset[1]][1] != rows[offset[0]][1]  # same x offset
    assert rows[tok.SPECIAL_BASE + block[0]].tolist() == rows[block[0]].tolist()  # patch starts share block rows
    assert rows[tok.EOS].tolist() == [NULL_ROW] * 3


def test_axis_factors_start_neutral_train_and_save_merged(tmp_path, batch):
    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    inputs, _, points = batch
    plain = load_checkpoint(init).model.eval()
    cfg = dict(stage="backbone", init=str(init), out=str(tmp_path / "f"), lr=3e-3, axis_factors=True, **FAST)
    tr = Trainer(TrainConfig(steps=4, **cfg))
    tr.model.eval()
    with torch.no_grad():
        start, _ = tr.model(inputs, cond=tr.model.encode(points))
        assert torch.equal(start, plain(inputs, cond=plain.encode(points))[0])  # factors start at zero
    tables = [n for n, _ in tr.model.named_parameters() if n.endswith(".table")]
    assert len(tables) == 3
    tr.model.train()
    tr.run()
    assert all(p.abs().sum() > 0 for n, p in tr.model.named_parameters() if n.endswith(".table"))
    tr.model.eval()
    ck = load_checkpoint(tmp_path / "f" / "model.safetensors")  # plain layout, factors summed in
    assert set(ck.model.state_dict()) == set(plain.state_dict()) and ck.meta["axis_factors"] is True
    with torch.no_grad():
        a, _ = tr.model(inputs, cond=tr.model.encode(points))
        b, _ = ck.model(inputs, cond=ck.model.encode(points))
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, start, atol=1e-3)
    resumed = Trainer(TrainConfig(steps=6, resume=True, **cfg))
    resumed.run()
    assert resumed.start_step == 4 and resumed.step == 6
    with pytest.raises(SettingsError, match="backbone stage"):
        Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), axis_factors=True, **FAST))


@pytest.mark.parametrize("eos_bias", [-1e4, 1e4])
def test_own_samples_teach_eos_only_where_the_backbone_ended(eos_bias):
    """A sample cut at the token limit did not end: no EOS target after it (the backbone never sampled one)."""
    from conftest import tiny_model
    from xspecmesh.geometry import tokenizer as tok
    from xspecmesh.training.trainer import own_samples

    model = tiny_model().eval()
    with torch.no_grad():
        model.to_logits.bias[tok.EOS] += eos_bias
        cond = model.encode(torch.randn(3, model.cfg.encoder.num_points, 6, generator=torch.Generator().manual_seed(0)))
    inputs, targets = own_samples(model, cond, 30, torch.Generator().manual_seed(0))
    lengths = (targets >= 0).sum(1)
    ended = (targets == tok.EOS).sum(1)
    if eos_bias < 0:  # every sample runs to the 30-token limit: all tokens are targets, none is EOS
        assert lengths.tolist() == [30] * 3 and ended.tolist() == [0] * 3
    else:  # every sample ends early, at an EOS it sampled: that EOS is its last target
        assert (lengths < 30).all() and ended.tolist() == [1] * 3
        assert [targets[i, n - 1].item() for i, n in enumerate(lengths.tolist())] == [tok.EOS] * 3


def test_stop_at_keeps_the_schedule_time_limit_and_loader_workers(tmp_path):
    cfg = TrainConfig(stage="backbone", out=str(tmp_path), steps=10, stop_at=3, workers=2, threads=1, device="cpu",
                      families="simple_parts", axis_aligned=True, axis_turns=24, **FAST)
    tr = Trainer(cfg)
    tr.run()
    assert tr.step == 3 and tr.lr_at(3) > tr.lr_at(9)  # stopped early; the cosine still ends at step 10
    meta = load_checkpoint(tmp_path / "model.safetensors").meta
    assert (meta["step"], meta["axis_turns"]) == (3, 24)
    timed = Trainer(TrainConfig(stage="backbone", out=str(tmp_path), steps=10, max_minutes=1e-9, resume=True, **FAST))
    timed.run()
    assert (timed.start_step, timed.step) == (3, 4)  # out of time after one step, and saved there
    assert load_checkpoint(tmp_path / "model.safetensors").meta["step"] == 4
    with pytest.raises(SettingsError):
        Trainer(TrainConfig(stage="backbone", out=str(tmp_path), device="tpu", **FAST))


def test_gpu_recipe_runs_end_to_end_on_cpu_at_tiny_scale(tmp_path):
    """tools/gpu_train.sh with its GPU settings swapped for seconds on the CPU: trains, saves, resumes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = write_random_checkpoint(tmp_path / "tiny.safetensors", "tiny", heads=0)
    env = dict(os.environ, DEVICE="cpu", INIT=str(init), STEPS="2", TOKEN_BUDGET="600", WORKERS="1", VAL_COUNT="2",
               PYTHON=sys.executable)
    env.pop("OUT", None)
    dest = tmp_path / "gpu"
    for _ in range(2):  # the second call finds the run finished and leaves it as it is
        proc = subprocess.run(["bash", os.path.join(root, "tools", "gpu_train.sh"), str(dest)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    meta = load_checkpoint(dest / "model.safetensors").meta
    assert (meta["step"], meta["families"], meta["axis_turns"]) == (2, "hard_surface", 24)
    assert (dest / "state.safetensors").exists()


def test_gpu_drafter_recipe_runs_end_to_end_on_cpu_at_tiny_scale(tmp_path):
    """tools/gpu_train.sh with STAGE=heads at seconds' scale on the CPU: trains an eagle drafter on the backbone's own
    samples too, saves, and exports the shipped-default form."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = write_random_checkpoint(tmp_path / "tiny.safetensors", "tiny", heads=0)
    env = dict(os.environ, STAGE="heads", DEVICE="cpu", INIT=str(init), TAPS="1", STEPS="2", TOKEN_BUDGET="600",
               WORKERS="1", VAL_COUNT="2", SELF_SAMPLES="1", PYTHON=sys.executable)
    dest = tmp_path / "drafter"
    proc = subprocess.run(["bash", os.path.join(root, "tools", "gpu_train.sh"), str(dest)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = load_checkpoint(dest / "default.safetensors")
    assert (shipped.meta["step"], shipped.meta["stage"], shipped.heads.cfg.kind) == (2, "heads", "eagle")
    assert tuple(shipped.heads.taps) == (1,) and shipped.max_heads == 6
    env["SAMPLE_FILE"] = str(tmp_path / "missing.safetensors")  # handed on as train heads --sample-file
    proc = subprocess.run(["bash", os.path.join(root, "tools", "gpu_train.sh"), str(tmp_path / "d2")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "cannot read the sample file" in proc.stderr


def test_large_token_budgets_fill_batches_beyond_the_default_pool():
    pairs = validation_pairs(8, config=ShapeConfig(families=("box",), max_faces=12), num_points=16)
    stream = (pairs[i % len(pairs)] for i in range(10**6))
    inputs, _, _ = next(batches(stream, token_budget=32768))
    assert len(inputs) > 64 and inputs.numel() <= 32768


def test_own_samples_decoded_ahead_into_a_file_come_back_with_their_shapes(tmp_path):
    """`dataset samples`' file holds the samples `own_sequences` decodes for the training stream's first shapes of a
    seed (batch by batch, one generator); reading it draws those shapes again and pairs each sample with its points,
    its end (EOS, or -1 where the token limit cut it) kept. Another backbone's samples, or a stream whose shapes
    changed, are refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from xspecmesh.geometry import tokenizer as tok
    from xspecmesh.training import sample_file
    from xspecmesh.training.data import iter_pairs
    from xspecmesh.training.trainer import own_sequences

    model = load_checkpoint(write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)).model.eval()
    shapes, n = ShapeConfig(max_faces=40), model.cfg.encoder.num_points
    with torch.no_grad():
        model.to_logits.bias[tok.EOS] += 2.0  # EOS likely: some samples end, some run to the limit
    path = tmp_path / "own.safetensors"
    summary = sample_file.write(path, model, shapes, count=5, seed=3, max_tokens=12, batch=2)
    got = sample_file.read(path, model)

    stream, gen, want = iter_pairs(3, shapes, num_points=n, augment=True), torch.Generator().manual_seed(3), []
    for size in (2, 2, 1):
        pairs = [next(stream) for _ in range(size)]
        with torch.no_grad():
            cond = model.encode(torch.from_numpy(np.stack([p.points for p in pairs])))
        want += [(p.points, s) for p, s in zip(pairs, own_sequences(model, cond, 12, gen))]
    assert len(got) == 5 and summary["tokens"] == sum(len(s.tokens) for _, s in want)
    for pair, (points, sample) in zip(got, want):
        assert np.array_equal(pair.points, points) and np.array_equal(pair.tokens, sample.tokens)
        assert pair.ended == sample.ended == (len(sample.tokens) < 12)
    assert 0 < summary["ended"] < 5  # both kinds of end are covered
    _, targets, _ = collate(got)
    for row, pair in zip(targets.tolist(), got):
        assert row[len(pair.tokens)] == (tok.EOS if pair.ended else -1)

    other = load_checkpoint(write_random_checkpoint(tmp_path / "b2.safetensors", "tiny", heads=0, seed=1)).model
    with pytest.raises(SettingsError, match="another backbone"):
        sample_file.read(path, other)
    with safe_open(str(path), framework="pt") as f:  # the same tokens, said to be of another seed's shapes
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "moved.safetensors"), metadata={**meta, "seed": "4"})
    with pytest.raises(SettingsError, match="no longer the one"):
        sample_file.read(tmp_path / "moved.safetensors", model)
    (tmp_path / "text.safetensors").write_text("not a sample file")
    for bad in ("missing.safetensors", "text.safetensors"):
        with pytest.raises(SettingsError, match="cannot read"):
            sample_file.read(tmp_path / bad, model)


def test_a_cut_sample_file_resumes_to_the_file_of_one_run(tmp_path):
    """Every batch is kept in the partial file with the generator's state: a run cut after two batches and resumed
    writes the same file as one uninterrupted run; other settings, or no --resume, start over."""
    from safetensors import safe_open

    from xspecmesh.training import sample_file

    model = load_checkpoint(write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)).model.eval()
    shapes = ShapeConfig(max_faces=40)
    args = dict(count=7, seed=3, max_tokens=12, batch=2)
    whole, cut = tmp_path / "whole.safetensors", tmp_path / "cut.safetensors"
    sample_file.write(whole, model, shapes, **args)

    def stop_after_two(n, seen=[]):  # (a run killed after its second batch)
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sample_file.write(cut, model, shapes, progress=stop_after_two, **args)
    assert not cut.exists() and sample_file.partial_path(cut).exists()
    with pytest.raises(SettingsError, match="other settings.*max_tokens"):
        sample_file.write(cut, model, shapes, resume=True, **(args | {"max_tokens": 13}))
    done = []
    sample_file.write(cut, model, shapes, progress=done.append, resume=True, **args)
    assert done == [4, 2, 1] and not sample_file.partial_path(cut).exists()  # 4 samples taken over, 3 decoded

    def content(path):
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    (meta_a, a), (meta_b, b) = content(whole), content(cut)
    assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_takes_its_own_samples_from_the_file_instead_of_decoding(tmp_path, monkeypatch):
    """--self-samples 1 --sample-file F: every micro-batch is a batch of the file's samples (no decode in training)."""
    from xspecmesh.training import sample_file, trainer as trainer_module

    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    model = load_checkpoint(init).model
    path = tmp_path / "own.safetensors"
    sample_file.write(path, model, ShapeConfig(max_faces=40), count=6, seed=5, max_tokens=20, batch=3)
    kept = {tuple(p.tokens.tolist()) for p in sample_file.read(path, model)}

    def no_decoding(*args, **kwargs):
        raise AssertionError("own samples were decoded in training")

    monkeypatch.setattr(trainer_module, "own_samples", no_decoding)
    tr = Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "h"), steps=2, num_heads=2,
                             head_type="eagle", self_samples=1.0, sample_file=str(path), **FAST))
    seen, real_loss = [], tr.loss

    def spy(inputs, targets, points, own):
        seen.extend(tuple(row[1 : int((t >= 0).sum()) + 1]) for row, t in zip(inputs.tolist(), targets))
        return real_loss(inputs, targets, points, own)

    monkeypatch.setattr(tr, "loss", spy)
    tr.run()
    assert seen and all(s in kept for s in seen)
    with pytest.raises(SettingsError, match="sample-file"):
        Trainer(TrainConfig(stage="heads", init=str(init), out=str(tmp_path / "x"), sample_file=str(path), **FAST))
    with pytest.raises(SettingsError, match="self-samples"):
        Trainer(TrainConfig(stage="backbone", init=str(init), out=str(tmp_path / "y"), self_samples=0.5, **FAST))


def test_stage2_own_samples_teach_the_drafter_alone(tmp_path, monkeypatch):
    """Stage lora with --self-samples 1 --sample-file F: every micro-batch is the backbone's own samples, whose loss is
    the drafter's alone (no λ-weighted cross-entropy to them), and the adapters still learn, through the features
    the drafter reads."""
    from xspecmesh.training import sample_file

    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=2)
    path = tmp_path / "own.safetensors"
    sample_file.write(path, load_checkpoint(init).model, ShapeConfig(max_faces=40), count=6, seed=5, max_tokens=20,
                      batch=3)
    tr = Trainer(TrainConfig(stage="lora", init=str(init), out=str(tmp_path / "l"), steps=3, lr=5e-3, num_heads=2,
                             lora_rank=4, self_samples=1.0, sample_file=str(path), **FAST))
    before, logs, real_loss = snapshot(tr.model), [], tr.loss

    def spy(inputs, targets, points, own):
        loss, log = real_loss(inputs, targets, points, own)
        logs.append((own, loss.item(), log))
        return loss, log

    monkeypatch.setattr(tr, "loss", spy)
    tr.run()
    assert logs and all(own for own, _, _ in logs)
    assert all(loss == pytest.approx(log["distill"]) and log["ce"] > 0 for _, loss, log in logs)
    diff = changed(before, tr.model)
    assert diff and all("lora_" in k for k in diff)


def test_dataset_samples_cli_writes_a_file_training_reads(tmp_path, capsys):
    from xspecmesh.cli import main
    from xspecmesh.training import sample_file

    init = write_random_checkpoint(tmp_path / "bb.safetensors", "tiny", heads=0)
    out = tmp_path / "own.safetensors"
    assert main(["dataset", "samples", "--checkpoint", str(init), "--count", "3", "--max-faces", "40", "--batch", "2",
                 "--device", "cpu", "-o", str(out)]) == 0
    assert "3 samples" in capsys.readouterr().out
    got = sample_file.read(out, load_checkpoint(init).model)
    assert len(got) == 3 and all(0 < len(p.tokens) <= 120 for p in got)
    assert main(["dataset", "samples", "--checkpoint", str(init), "--count", "0", "-o", str(out)]) == 2

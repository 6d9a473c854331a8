"""`xspecmesh convert-bpt`: restricted reading of pickled checkpoints, the published name mapping, end to end.

Synthetic files in the published layout are written here with torch.save (writing is fine; only reading must be
restricted). Their names come from `published_name` below, written independently of the converter's generator."""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

import pytest
import torch

from xspecmesh import cli
from xspecmesh.model.checkpoint import load_checkpoint
from xspecmesh.model.config import preset
from xspecmesh.model.convert_bpt import Foreign, convert_bpt, layout, read_pickled_checkpoint
from xspecmesh.errors import CheckpointError
from xspecmesh.model.transformer import MeshTransformer

REFERENCE_KEYS = Path(__file__).parent / "data" / "reference" / "bpt_state_dict_keys.txt"
PERCEIVER = "conditioner.point_encoder.model.shape_model.encoder."


def published_name(ours: str) -> str:
    """The published name of one of our parameters (all but `type_embed`, whose rows are three vectors)."""
    if ours == "bos":
        return "sos_token"
    if ours.startswith("encoder."):
        name = re.sub(r"^cross\.", "cross_attn.", ours[len("encoder."):])
        name = re.sub(r"^blocks\.(\d+)\.", r"self_attn.resblocks.\1.", name)
        for a, b in (("attn.to_qkv.", "attn.c_qkv."), ("attn.to_q.", "attn.c_q."), ("attn.to_kv.", "attn.c_kv."),
                     ("attn.proj.", "attn.c_proj."), ("mlp.fc.", "mlp.c_fc."), ("mlp.proj.", "mlp.c_proj.")):
            name = name.replace(a, b)
        return PERCEIVER + name
    m = re.match(r"layers\.(\d+)\.(\w+)\.(.+)$", ours)
    if m:
        i, part, rest = int(m[1]), m[2], m[3]
        sub, where = {"self_norm": (0, "0.0"), "self_attn": (0, "1"), "cross_norm": (1, "0.0"),
                      "cross_attn": (1, "1"), "ff_norm": (2, "0.0"), "ff": (2, "1.ff")}[part]
        if part == "ff":
            rest = re.sub(r"^proj\.", "0.proj.", re.sub(r"^out\.", "2.", rest))
        return f"decoder.layers.{3 * i + sub}.{where}.{rest}"
    if ours.startswith("final_norm."):
        return "decoder." + ours
    if ours.startswith("pos_embed."):
        return "abs_pos_emb." + ours[len("pos_embed."):]
    if ours.startswith(("cond_head_proj.", "cond_proj.")):
        return "conditioner." + ours
    return ours  # token_embed.weight, to_logits.*


def small_config():
    """`tiny` with the never-run published parts present too, so the synthetic file has the full layout."""
    cfg = preset("tiny")
    cfg.encoder.unused_kl_channels = 4
    cfg.encoder.unused_decoder_depth = 1
    return cfg


def export(model: MeshTransformer) -> dict[str, torch.Tensor]:
    """The model's weights under the published names, ignored parts filled with noise."""
    sd = {}
    for name, t in model.state_dict().items():
        if name == "type_embed":  # views of one storage, as a pickled tensor's slices would be
            for row, pub in enumerate(("block_embed", "offset_embed", "sp_block_embed")):
                sd[pub] = t[row:row + 1]
        else:
            sd[published_name(name)] = t
    for slot in layout(model.cfg):
        if slot.ours is None:
            sd[slot.published] = torch.randn(slot.shape)
    return sd


def _write_marker(path):
    Path(path).write_text("ran")
    return "executed"


class Payload:
    """Unpickling this runs `_write_marker` (a stand-in for hostile code) unless the reader refuses it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


class ExecPayload(Payload):
    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MeshTransformer(small_config()).eval()


def _logits(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(2, model.cfg.encoder.num_points, 6, generator=g)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        return model(tokens, model.encode(points))[0]


def _cli(capsys, *argv):
    code = cli.main(["convert-bpt", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_keeps_logits_exactly(tmp_path, model):
    src, dst = tmp_path / "bpt.pt", tmp_path / "bpt.safetensors"
    args = {"lr": 1e-4, "tags": {"a", "b"}, "blob": b"\x00\xff", "shape": (1, 2.5, None)}  # plain containers only
    torch.save({"model": export(model), "args": args, "epoch": 3}, src)
    done = convert_bpt(src, dst, model.cfg, dtype="float32")
    assert done.ignored == sum(s.ours is None for s in layout(model.cfg)) > 0 and not done.foreign
    ck = load_checkpoint(dst)
    assert ck.model.cfg == model.cfg and ck.heads is None and ck.meta["converted_from"] == "bpt.pt"
    assert torch.equal(_logits(ck.model), _logits(model))


def test_cli_default_float16_and_top_level_state_dict(tmp_path, model, capsys):
    src, dst, cfg = tmp_path / "sd.pt", tmp_path / "out" / "m.safetensors", tmp_path / "cfg.json"
    torch.save(export(model), src)  # a file whose top level is the state dict itself
    cfg.write_text(model.cfg.to_json())
    code, out, err = _cli(capsys, src, dst, "--config", cfg)
    assert code == 0 and "wrote" in out and "float16" in out and not err
    ck = load_checkpoint(dst)
    assert torch.equal(ck.model.token_embed.weight, model.token_embed.weight.half().float())
    assert torch.equal(ck.model.type_embed, model.type_embed.half().float())
    assert torch.allclose(_logits(ck.model), _logits(model), atol=2e-2)


@pytest.mark.parametrize("payload, named", [(Payload, "_write_marker"), (ExecPayload, "builtins.exec")])
def test_foreign_global_is_refused_without_running(tmp_path, model, capsys, payload, named):
    src, dst, marker = tmp_path / "evil.pt", tmp_path / "out.safetensors", tmp_path / "marker"
    torch.save({"model": export(model), "args": payload(marker)}, src)
    with pytest.raises(CheckpointError, match=f"refusing to unpickle .*{named}"):
        read_pickled_checkpoint(src)
    code, out, err = _cli(capsys, src, dst, "--config", _config_file(tmp_path, model))
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err and "nothing was executed" in err
    assert not marker.exists() and not dst.exists()


def test_ignore_foreign_extracts_model_without_running(tmp_path, model, capsys):
    src, dst, marker = tmp_path / "train.pt", tmp_path / "out.safetensors", tmp_path / "marker"
    torch.save({"model": export(model), "args": argparse.Namespace(lr=1e-4), "hook": Payload(marker)}, src)
    obj, foreign = read_pickled_checkpoint(src, ignore_foreign=True)
    assert isinstance(obj["hook"], Foreign) and obj["hook"].args == (str(marker),)
    assert isinstance(obj["args"], Foreign) and obj["args"].state == {"lr": 1e-4}
    assert "argparse.Namespace" in foreign and any(n.endswith("._write_marker") for n in foreign)
    code, out, err = _cli(capsys, src, dst, "--config", _config_file(tmp_path, model), "--ignore-foreign",
                          "--dtype", "float32")
    assert code == 0 and "placeholders" in out and "argparse.Namespace" in out
    assert not marker.exists()
    assert torch.equal(_logits(load_checkpoint(dst).model), _logits(model))


def test_wrong_and_missing_tensors_are_named(tmp_path, model, capsys):
    sd = export(model)
    sd["decoder.layers.1.1.mem_k"] = torch.zeros(2, 3, 16)
    del sd["conditioner.point_encoder.model.shape_model.pre_kl.bias"]
    sd["extra.weight"] = torch.zeros(1)
    src = tmp_path / "bad.pt"
    torch.save({"model": sd}, src)
    code, out, err = _cli(capsys, src, tmp_path / "o.safetensors", "--config", _config_file(tmp_path, model))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "decoder.layers.1.1.mem_k: expected shape [2, 4, 16], found [2, 3, 16]" in err
    assert "1 missing (e.g. conditioner.point_encoder.model.shape_model.pre_kl.bias)" in err
    assert "1 unexpected (e.g. extra.weight)" in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "plain.pt").write_bytes(b"\x80\x02}q\x00.")  # a bare pickle, not a torch zip archive
    torch.save({"model": ["not", "tensors"]}, tmp_path / "list.pt")
    for argv, expect in [(["only-src"], "needs SRC and DST"),
                         ([tmp_path / "missing.pt", tmp_path / "o"], "not found"),
                         ([tmp_path / "plain.pt", tmp_path / "o"], "not a torch zip-format"),
                         ([tmp_path / "list.pt", tmp_path / "o"], "not a state dict"),
                         (["--list-expected-keys", "--preset", "nope"], "unknown preset")]:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, (argv, err)


def test_big_endian_storages(tmp_path):
    src, swapped = tmp_path / "le.pt", tmp_path / "be.pt"
    tensors = {"w": torch.arange(6.0).view(2, 3) - 2.5, "b": torch.tensor([1.5, -2.0])}
    torch.save(tensors, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(swapped, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:  # float32 only: swap each 4-byte group
                data = b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
            zout.writestr(info, data)
    obj, _ = read_pickled_checkpoint(swapped)
    assert obj.keys() == tensors.keys() and all(torch.equal(obj[k], tensors[k]) for k in tensors)


def test_mapping_covers_every_parameter_once():
    """At full size (meta device): each of our parameters is fed exactly once, with the independent names above."""
    cfg = preset("bpt")
    slots = layout(cfg)
    with torch.device("meta"):
        ours = set(MeshTransformer(cfg).state_dict())
    fed = [s.ours for s in slots if s.ours is not None and s.row is None]
    assert len(fed) == len(set(fed)) and set(fed) | {"type_embed"} == ours
    assert sorted(s.row for s in slots if s.ours == "type_embed") == [0, 1, 2]
    assert all(published_name(s.ours) == s.published for s in slots if s.ours and s.row is None)


def test_list_expected_keys_matches_reference(capsys):
    code, out, err = _cli(capsys, "--list-expected-keys")
    reference = REFERENCE_KEYS.read_text().splitlines()
    assert code == 0 and not err
    listed = out.splitlines()
    shapes = lambda lines: dict(line.rsplit(" ", 1) for line in lines)  # noqa: E731
    assert len(listed) == len(reference) == 802 and shapes(listed) == shapes(reference)
    assert listed == reference  # the published order too


def _config_file(tmp_path, model) -> Path:
    path = tmp_path / "config.json"
    path.write_text(model.cfg.to_json())
    return path

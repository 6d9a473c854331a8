"""The published BPT checkpoint (a torch zip-format pickle) -> our safetensors checkpoint, converted once.

Reading never runs code from the file. `read_pickled_checkpoint` opens the zip with `zipfile` and unpickles
`<archive>/data.pkl` with `TensorUnpickler`, whose `find_class` answers only what rebuilding tensors and plain
containers needs, each with a stand-in of ours (our own rebuild functions, dtype markers for the storage types,
`OrderedDict`, a few inert builtins); storages are read as raw bytes from `<archive>/data/<key>`. Any other global
the pickle names is refused with a `CheckpointError` naming it, before anything is called. With `ignore_foreign`
such globals become `Foreign` placeholders instead: making one records its arguments and nothing else, the named
module is never imported and nothing of it runs, so a file whose pickle also carries training objects (argument
namespaces, optimiser classes) still yields its `model` entry safely. Neither `pickle.load` nor `torch.load` is used.

Mapping: `layout(cfg)` lists every published name with its shape, in the published order, and the name of ours it
feeds, generated from the config (depths, widths); `layout(preset("bpt"))` is exactly the reference key list.
Published parts BPT never runs (the perceiver's shape projection, KL bottleneck, latent transformer and geometry
decoder) are expected, so the key set must match exactly, and then ignored. Their presence and size come from
`EncoderConfig.unused_kl_channels` (> 0: shape projection, pre/post KL and geometry decoder exist) and
`unused_decoder_depth` (latent transformer blocks); both are 0 outside the `bpt` preset.
"""
from __future__ import annotations

import io
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xspecmesh.model.checkpoint import save_checkpoint, shape_problems
from xspecmesh.model.config import ModelConfig
from xspecmesh.errors import CheckpointError
from xspecmesh.model.transformer import FourierEmbedder, MeshTransformer, PerceiverBlock

# ---------------------------------------------------------------------------------------------- restricted reading

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


@dataclass(frozen=True)
class _StorageType:
    """What `torch.<X>Storage` unpickles to here: just its element type."""

    dtype: torch.dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a strided view of a storage we read (bounds are checked)."""
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError(f"a tensor refers to {type(storage).__name__}, not to a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): the tensor itself."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for _codecs.encode, which protocol-2 pickles use for bytes values."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("unexpected use of _codecs.encode in the pickle")
    return text.encode("latin1")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
    **{("builtins", t.__name__): t for t in (set, frozenset, complex)},
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Foreign:
    """Inert placeholder for a global the pickle names that we do not allow (only with `ignore_foreign`).

    Each foreign name gets its own subclass carrying `module` and `name` as plain strings. Calling it, building it or
    filling it only records the arguments; nothing is imported and no code of the named module exists here to run."""

    module = name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass  # __new__ recorded everything

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<foreign {self.module}.{self.name}>"


class TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors, plain containers and nothing else (see the module docstring)."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, swap_bytes: bool, ignore_foreign: bool,
                 source: str):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.archive, self.prefix, self.swap_bytes = archive, prefix, swap_bytes
        self.ignore_foreign, self.source = ignore_foreign, source
        self.storages: dict[str, torch.Tensor] = {}
        self.foreign: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)  # protocol-2 pickles name builtins the Python 2 way
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if not self.ignore_foreign:
            raise CheckpointError(
                f"{self.source}: refusing to unpickle {module}.{name}: only tensors and plain containers are read "
                "and nothing was executed (--ignore-foreign replaces such objects with inert placeholders)")
        if (module, name) not in self.foreign:
            stand_in = type(f"Foreign[{module}.{name}]", (Foreign,), {"module": module, "name": name})
            self.foreign[(module, name)] = stand_in
        return self.foreign[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise CheckpointError(f"{self.source}: unexpected persistent reference {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, kind.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != kind.dtype:
            raise CheckpointError(f"{self.source}: storage {key} is used as both {storage.dtype} and {kind.dtype}")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        record = f"{self.prefix}/data/{key}"
        try:
            raw = bytearray(self.archive.read(record))
        except KeyError:
            raise CheckpointError(f"{self.source}: storage record {record} is missing") from None
        if len(raw) != numel * dtype.itemsize:
            raise CheckpointError(f"{self.source}: storage {key} has {len(raw)} bytes, expected {numel} x {dtype}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        data = torch.frombuffer(raw, dtype=torch.uint8)
        unit = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
        if self.swap_bytes and unit > 1:
            data = data.view(-1, unit).flip(-1).reshape(-1)
        return data.view(dtype)


def read_pickled_checkpoint(path, ignore_foreign: bool = False) -> tuple[object, list[str]]:
    """The object pickled in a torch zip-format file, read without executing anything from it, and the foreign
    names replaced by placeholders (always empty unless `ignore_foreign`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip-format checkpoint (the legacy pre-zip format is not read)")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one <archive>/data.pkl record, found {len(pickles)}")
        prefix = pickles[0].rpartition("/")[0]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byte order {byteorder!r}")
        unpickler = TensorUnpickler(archive.read(pickles[0]), archive, prefix, byteorder != sys.byteorder,
                                    ignore_foreign, str(path))
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except Exception as exc:  # a corrupt or hostile pickle: report it, never run it
            raise CheckpointError(f"{path}: cannot read the pickle ({type(exc).__name__}: {exc})") from None
    return obj, [f"{m}.{n}" for m, n in sorted(unpickler.foreign)]


def state_dict_of(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The `model` entry of a training checkpoint, or the object itself when it is already a state dict."""
    if isinstance(obj, Mapping) and "model" in obj:
        sd, where = obj["model"], "its 'model' entry"
    elif isinstance(obj, Mapping):
        sd, where = obj, "its top level (no 'model' entry)"
    else:
        raise CheckpointError(f"{source} holds {type(obj).__name__}, not a dict with a 'model' entry")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: {where} is {type(sd).__name__}, not a state dict")
    bad = [str(k) for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{source}: {where} is not a state dict ({len(bad)} entries are not named tensors, "
                              f"e.g. {', '.join(bad[:4])})")
    return dict(sd)


# ---------------------------------------------------------------------------------------------- name mapping

_SHAPE_MODEL = "conditioner.point_encoder.model.shape_model"


@dataclass(frozen=True)
class Slot:
    """One published tensor: its name and shape, and the parameter of ours it feeds (None: never run, ignored)."""

    published: str
    shape: tuple[int, ...]
    ours: str | None = None
    row: int | None = None  # the published [1, dim] vector is this row of `ours` (the token-type embeddings)


def _block_parts(cross: bool) -> list[tuple[str, str]]:
    """(published, ours) module names inside one perceiver residual block, in the published order."""
    attn = [("attn.c_q", "attn.to_q"), ("attn.c_kv", "attn.to_kv")] if cross else [("attn.c_qkv", "attn.to_qkv")]
    mlp = [("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")]
    if cross:
        rest = [("ln_1", "ln_1"), ("ln_2", "ln_2")] + mlp + [("ln_3", "ln_3")]
    else:
        rest = [("ln_1", "ln_1")] + mlp + [("ln_2", "ln_2")]
    return attn + [("attn.c_proj", "attn.proj")] + rest


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def layout(cfg: ModelConfig) -> list[Slot]:
    """Every tensor of the published checkpoint for `cfg`, in the published order (shapes from a meta-device
    model, so this is instant even for the 500M configuration)."""
    enc, w = cfg.encoder, cfg.encoder.width
    with torch.device("meta"):
        ours = _shapes(MeshTransformer(cfg))
        block_shapes = {cross: _shapes(PerceiverBlock(enc, cross)) for cross in (True, False)}
    slots: list[Slot] = []

    def add(published: str, our: str, shapes=ours, used: bool = True) -> None:
        """A parameter of ours, or every parameter under one of our modules (same names below it)."""
        names = [our] if our in shapes else [k for k in shapes if k.startswith(our + ".")]
        if not names:
            raise AssertionError(f"the mapping names {our!r}, which the model does not have")
        slots.extend(Slot(published + k[len(our):], shapes[k], k if used else None) for k in names)

    def add_block(published: str, our: str | None, cross: bool) -> None:
        for p, o in _block_parts(cross):
            if our is None:
                add(f"{published}.{p}", o, block_shapes[cross], used=False)
            else:
                add(f"{published}.{p}", f"{our}.{o}")

    def unused(published: str, *shape: int) -> None:
        slots.append(Slot(published, shape))

    type_row = (1, ours["type_embed"][1])
    slots.append(Slot("sp_block_embed", type_row, "type_embed", 2))
    add("sos_token", "bos")
    slots.append(Slot("block_embed", type_row, "type_embed", 0))
    slots.append(Slot("offset_embed", type_row, "type_embed", 1))
    add("token_embed", "token_embed")
    add("abs_pos_emb", "pos_embed")

    kl = enc.unused_kl_channels
    if kl:
        unused(_SHAPE_MODEL.rpartition(".")[0] + ".shape_projection", w, w)
    e = f"{_SHAPE_MODEL}.encoder"
    add(f"{e}.query", "encoder.query")
    add(f"{e}.input_proj", "encoder.input_proj")
    add_block(f"{e}.cross_attn", "encoder.cross", cross=True)
    for i in range(enc.depth):
        add_block(f"{e}.self_attn.resblocks.{i}", f"encoder.blocks.{i}", cross=False)
    add(f"{e}.ln_post", "encoder.ln_post")
    if kl:
        unused(f"{_SHAPE_MODEL}.pre_kl.weight", 2 * kl, w)
        unused(f"{_SHAPE_MODEL}.pre_kl.bias", 2 * kl)
        unused(f"{_SHAPE_MODEL}.post_kl.weight", w, kl)
        unused(f"{_SHAPE_MODEL}.post_kl.bias", w)
    for i in range(enc.unused_decoder_depth):
        add_block(f"{_SHAPE_MODEL}.transformer.resblocks.{i}", None, cross=False)
    if kl:
        g = f"{_SHAPE_MODEL}.geo_decoder"
        unused(f"{g}.query_proj.weight", w, FourierEmbedder.out_dim(enc.num_freqs))
        unused(f"{g}.query_proj.bias", w)
        add_block(f"{g}.cross_attn_decoder", None, cross=True)
        for part in ("weight", "bias"):
            unused(f"{g}.ln_post.{part}", w)
        unused(f"{g}.output_proj.weight", 1, w)
        unused(f"{g}.output_proj.bias", 1)
    add("conditioner.cond_head_proj", "cond_head_proj")
    add("conditioner.cond_proj", "cond_proj")

    for i in range(cfg.depth):  # one block of ours = three published sub-layers (norm, self) (norm, cross) (norm, ff)
        a, c, f = (f"decoder.layers.{3 * i + j}" for j in range(3))
        add(f"{a}.0.0", f"layers.{i}.self_norm")
        add(f"{a}.1", f"layers.{i}.self_attn")
        add(f"{c}.0.0", f"layers.{i}.cross_norm")
        add(f"{c}.1", f"layers.{i}.cross_attn")
        add(f"{f}.0.0", f"layers.{i}.ff_norm")
        add(f"{f}.1.ff.0.proj", f"layers.{i}.ff.proj")
        add(f"{f}.1.ff.2", f"layers.{i}.ff.out")
    add("decoder.final_norm", "final_norm")
    add("to_logits", "to_logits")
    return slots


def expected_key_lines(cfg: ModelConfig) -> list[str]:
    """`name [d0,d1,...]` per published tensor, as in tests/data/reference/bpt_state_dict_keys.txt."""
    return [f"{s.published} [{','.join(map(str, s.shape))}]" for s in layout(cfg)]


def to_ours(published: Mapping[str, torch.Tensor], slots: list[Slot]) -> dict[str, torch.Tensor]:
    """Our state dict from published tensors (names and shapes already checked); ignored parts are dropped."""
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for s in slots:
        if s.ours is None:
            continue
        if s.row is None:
            out[s.ours] = published[s.published]
        else:
            rows.setdefault(s.ours, {})[s.row] = published[s.published].reshape(-1)
    for name, parts in rows.items():
        out[name] = torch.stack([parts[i] for i in sorted(parts)])
    seen = set()
    for name, t in out.items():  # safetensors refuses tensors that share memory (views of one pickled storage)
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            out[name] = t.clone()
        seen.add(ptr)
    return out


# ---------------------------------------------------------------------------------------------- conversion


@dataclass
class Converted:
    path: Path
    tensors: int  # in our checkpoint
    parameters: int
    ignored: int  # published tensors BPT never runs
    foreign: list[str] = field(default_factory=list)  # names replaced by placeholders (--ignore-foreign)


def convert_bpt(src, dst, cfg: ModelConfig, dtype: str = "float16", ignore_foreign: bool = False,
                meta: dict | None = None) -> Converted:
    """Read `src` (restricted), check it against `layout(cfg)`, write our checkpoint to `dst` in `dtype`."""
    src, dst = Path(src), Path(dst)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise CheckpointError("SRC and DST are the same file")
    obj, foreign = read_pickled_checkpoint(src, ignore_foreign)
    published = state_dict_of(obj, str(src))
    del obj
    slots = layout(cfg)
    problems = shape_problems({s.published: s.shape for s in slots}, {k: tuple(v.shape) for k, v in published.items()})
    if problems:
        raise CheckpointError(f"{src} does not match the expected BPT layout: " + "; ".join(problems))
    ours = to_ours(published, slots)
    # Built on the meta device and filled by assignment: no random init, no second copy of 500M weights. The model
    # is only written out (its non-persistent buffers stay on meta and are not part of the checkpoint).
    with torch.device("meta"):
        model = MeshTransformer(cfg)
    model.load_state_dict(ours, strict=True, assign=True)
    ignored = sum(s.ours is None for s in slots)
    info = {"source": "published BPT checkpoint", "converted_from": src.name, "ignored_tensors": ignored,
            **({"foreign_placeholders": foreign} if foreign else {}), **(meta or {})}
    path = save_checkpoint(dst, model, None, dtype=dtype, meta=info)
    return Converted(path, len(ours), sum(t.numel() for t in ours.values()), ignored, foreign)

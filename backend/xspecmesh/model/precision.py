"""Weight precision of the decoding path: fp32, int8 (CPU) or bf16, chosen once when a checkpoint is loaded.

int8 is PyTorch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`): every `nn.Linear` of the decoder
and of the drafter keeps int8 weights (one scale per layer), and its input is quantized per call. A decoding step
of a large model is bound by reading its weights, so a quarter of the bytes is most of the gain; the point encoder,
the condition projections and the cross-attention keys/values over the condition (backbone and drafter) run once per
mesh and stay in fp32.

`auto` is bf16 on a CUDA device that supports it, else fp32; on the CPU it is int8 only for a checkpoint whose
metadata records the quality check as passed (`int8_agreement`, the teacher-forced top-1 agreement with fp32 that
`xspecmesh bench --precision-check` measures, at least AGREEMENT_NEEDED), else fp32.

This module imports torch only inside functions, so the CLI can add its option without loading torch.
"""
from __future__ import annotations

import functools
import warnings

PRECISIONS = ("auto", "fp32", "int8", "bf16")  # tested equal to xspecmesh.decoding.settings_schema's
# Modules that run once per mesh (the condition), not once per token: quantizing them would buy nothing. PER_MESH are
# the backbone's top-level names; any module whose name ends with a PER_MESH_SUFFIXES entry computes the
# cross-attention keys/values over the condition (`context_kv`), in the backbone's layers and in a draft decoder.
PER_MESH = ("encoder", "cond_head_proj", "cond_proj")
PER_MESH_SUFFIXES = ("cross_attn.to_k", "cross_attn.to_v")
INT8_ENGINES = ("x86", "fbgemm", "qnnpack")  # PyTorch's quantized CPU engines, preferred first
NO_INT8 = "this PyTorch build has no int8 CPU kernels; use --precision fp32"
AGREEMENT_NEEDED = 0.99
# From this many weights up, a one-row fp32 linear is faster on oneDNN's packed weights than on aten's BLAS path, as a
# decode meets them: each weight read once per step, from L3 or memory (one thread, 48 weights in turn: 768 x 256 28
# against 47 us, 1024 x 256 36 against 67, 512 x 256 21 against 23, 256 x 256 14 against 6; AR steps 2.47 ms at 2^17,
# 2.52 at 2^18, 2.59 at 2^19, 2.55 at 2^16). A single weight timed in a loop stays in cache and favours aten (768 x
# 256: 20 against 12 us), which set 2^19 before (docs/BENCHMARKS.md, "2026-12-01, third session").
ONE_ROW_ONEDNN = 1 << 17


def add_argument(parser) -> None:
    """The `--precision` option, shared by every command that loads a model."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="weights of the decoder and drafter: int8 (CPU only), bf16, fp32; auto (default): bf16 on "
                             "a CUDA GPU that supports it; int8 on a CPU if the checkpoint passed the int8 quality "
                             "check; else fp32")


def resolve(precision: str, device, meta: dict | None = None) -> str:
    """auto -> the concrete precision for `device` and a checkpoint with metadata `meta`; an unsupported
    combination is a SettingsError."""
    import torch

    from xspecmesh.errors import SettingsError

    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        passed = float((meta or {}).get("int8_agreement", 0.0)) >= AGREEMENT_NEEDED
        return "int8" if passed and _has_int8_kernels() else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise SettingsError("int8 weights run on the CPU only; use --precision fp32 or bf16 on a GPU")
    if precision == "int8" and not _has_int8_kernels():
        raise SettingsError(NO_INT8)
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise SettingsError("this GPU does not support bf16; use --precision fp32")
    return precision


def _int8_engine() -> str | None:
    """The quantized engine int8 runs on: the first of INT8_ENGINES that this build supports (None: none)."""
    import torch

    return next((e for e in INT8_ENGINES if e in torch.backends.quantized.supported_engines), None)


def _has_int8_kernels() -> bool:
    return _int8_engine() is not None


def apply(model, heads, precision: str) -> None:
    """Convert a loaded fp32 backbone and its drafter (or None) in place to a concrete precision."""
    import torch

    if precision == "fp32":
        if next(model.parameters()).device.type == "cpu":
            linear = onednn_linear_class()  # nn.Linear itself where oneDNN's op is missing or wrong: no change
            # A draft decoder's products stay on aten's path: they are small (<= 2^17 weights) and read again within
            # microseconds, where aten's path is the faster (one sequence: drafting -8%; a batch of 8: -5% a token;
            # docs/BENCHMARKS.md, "2026-12-01, fourth session"). The paper's heads' vocabulary projections are large,
            # as the backbone's.
            from xspecmesh.model.drafter import DraftDecoder

            for module in _per_token_linears(model, None if isinstance(heads, DraftDecoder) else heads):
                module.__class__ = linear  # same parameters and state dict, another kernel
        return
    if precision == "bf16":
        for module in (model, heads):
            if module is not None:
                module.to(torch.bfloat16)
        return
    if precision != "int8":
        raise ValueError(f"not a concrete precision: {precision!r}")
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; in torch 2.13 it works and needs no new dependency
        # (if a later torch drops it, int8 becomes torchao's `quantize_(model, Int8DynamicActivationInt8WeightConfig())`).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        from xspecmesh.errors import SettingsError

        engine = _int8_engine()
        if engine is None:
            raise SettingsError(NO_INT8)
        # The weights are packed for the engine that is current when they are quantized: make it one this build has.
        torch.backends.quantized.engine = engine
        chosen = {id(m) for m in _per_token_linears(model, heads)}
        for module in (model, heads):
            if module is not None:
                spec = {name: default_dynamic_qconfig for name, m in module.named_modules() if id(m) in chosen}
                quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)


def _per_token_linears(model, heads) -> list:
    """Every nn.Linear of the backbone and the drafter, by type (any drafter kind), minus the per-mesh modules."""
    from torch import nn

    found = [m for name, m in model.named_modules()
             if type(m) is nn.Linear and name.split(".")[0] not in PER_MESH and not name.endswith(PER_MESH_SUFFIXES)]
    return found + ([m for name, m in heads.named_modules()
                     if type(m) is nn.Linear and not name.endswith(PER_MESH_SUFFIXES)] if heads is not None else [])


@functools.cache
def onednn_linear_class():
    """nn.Linear whose inference forward on CPU fp32 over a few rows calls oneDNN's linear instead of aten's (BLAS)
    one. On our CPU the BLAS path costs 2-5x for 2-6 rows what it costs for one, so verifying D+1 positions cost
    several AR steps; oneDNN's cost grows little with the rows (docs/BENCHMARKS.md, CPU precision and overhead).
    For one row (an AR step) aten's path is faster on small layers and oneDNN's on large ones (the 500M
    architecture's AR step: 152 -> 127 ms), so one row takes oneDNN from ONE_ROW_ONEDNN weights up; training keeps
    aten's path. The op is private: where `_onednn_linear_works` finds it missing or wrong, this is nn.Linear
    itself."""
    import torch
    from torch import nn

    if not _onednn_linear_works():
        return nn.Linear

    class OneDNNLinear(nn.Linear):
        def forward(self, x):
            if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                    and (x.numel() > x.shape[-1] or self.weight.numel() >= ONE_ROW_ONEDNN)):
                return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
            return super().forward(x)

        def _packed_weight(self):
            """The weight in oneDNN's own blocked layout, made once and remade if the weight changes: on plain
            weights oneDNN reorders them on every call, which cost a 5-row verify ~1.4 AR steps instead of ~1.1
            (docs/BENCHMARKS.md, "Pre-packed weights")."""
            key = (self.weight.data_ptr(), self.weight._version)
            if self.__dict__.get("_packed_key") != key:
                self.__dict__["_packed"] = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
                self.__dict__["_packed_key"] = key
            return self.__dict__["_packed"]

        def __getstate__(self):  # an opaque oneDNN tensor cannot be copied or pickled: the copy packs its own
            state = super().__getstate__()
            return {k: v for k, v in state.items() if k not in ("_packed", "_packed_key")}

    return OneDNNLinear


def _onednn_linear_works() -> bool:
    """oneDNN's private linear ops (weight packing, linear) exist in this build and agree with aten's on a few
    rows."""
    import torch
    import torch.nn.functional as F

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), b, "none",
                                                     [], "")
        return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except Exception:  # missing from this build, or refusing this CPU: aten's linear it is
        return False


def linear_counts(module) -> dict[str, int]:
    """How many float and int8 linear layers a module holds (for tests and the load log)."""
    from torch import nn
    from torch.ao.nn.quantized import dynamic

    return {"float": sum(isinstance(m, nn.Linear) for m in module.modules()),
            "int8": sum(isinstance(m, dynamic.Linear) for m in module.modules())}

"""Weight precision of the decoding path: fp32, int8 (CPU) or bf16, chosen once when a checkpoint is loaded.

int8 is PyTorch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`): every `nn.Linear` of the decoder
and of the drafter keeps int8 weights (one scale per layer), and its input is quantized per call. A decoding step
of a large model is bound by reading its weights, so a quarter of the bytes is most of the gain; the point encoder
and the condition projections run once per mesh and stay in fp32.

`auto` is bf16 on a CUDA device that supports it, else fp32; on the CPU it is int8 only for a checkpoint whose
metadata records the quality check as passed (`int8_agreement`, the teacher-forced top-1 agreement with fp32 that
`xspecmesh bench --precision-check` measures, at least AGREEMENT_NEEDED), else fp32.

This module imports torch only inside functions, so the CLI can add its option without loading torch.
"""
from __future__ import annotations

import functools
import warnings

PRECISIONS = ("auto", "fp32", "int8", "bf16")  # tested equal to xspecmesh.decoding.settings_schema's
# Modules that run once per mesh (the condition), not once per token: quantizing them would buy nothing.
PER_MESH = ("encoder", "cond_head_proj", "cond_proj")
AGREEMENT_NEEDED = 0.99


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
        raise SettingsError("this PyTorch build has no int8 CPU kernels; use --precision fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise SettingsError("this GPU does not support bf16; use --precision fp32")
    return precision


def _has_int8_kernels() -> bool:
    import torch

    return bool({"fbgemm", "x86", "qnnpack"} & set(torch.backends.quantized.supported_engines))


def apply(model, heads, precision: str) -> None:
    """Convert a loaded fp32 backbone and its drafter (or None) in place to a concrete precision."""
    import torch
    from torch import nn

    if precision == "fp32":
        if next(model.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available():
            linear = onednn_linear_class()
            for module in _per_token_linears(model, heads):
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

        for module in (model, heads):
            if module is not None:
                spec = {name: default_dynamic_qconfig for name, m in module.named_modules()
                        if any(m is x for x in _per_token_linears(model, heads))}
                quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)


def _per_token_linears(model, heads) -> list:
    """Every nn.Linear of the backbone and the drafter, by type (any drafter kind), minus the per-mesh modules."""
    from torch import nn

    found = [m for name, m in model.named_modules()
             if type(m) is nn.Linear and name.split(".")[0] not in PER_MESH]
    return found + ([m for m in heads.modules() if type(m) is nn.Linear] if heads is not None else [])


@functools.cache
def onednn_linear_class():
    """nn.Linear whose inference forward on CPU fp32 over a few rows calls oneDNN's linear instead of aten's (BLAS)
    one. On our CPU the BLAS path costs 2-5x for 2-6 rows what it costs for one, so verifying D+1 positions cost
    several AR steps; oneDNN's cost grows little with the rows (docs/BENCHMARKS.md, CPU precision and overhead).
    One row (an AR step) and training keep aten's path."""
    import torch
    from torch import nn

    class OneDNNLinear(nn.Linear):
        def forward(self, x):
            if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                    and x.numel() > x.shape[-1]):
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return super().forward(x)

    return OneDNNLinear


def linear_counts(module) -> dict[str, int]:
    """How many float and int8 linear layers a module holds (for tests and the load log)."""
    from torch import nn
    from torch.ao.nn.quantized import dynamic

    return {"float": sum(isinstance(m, nn.Linear) for m in module.modules()),
            "int8": sum(isinstance(m, dynamic.Linear) for m in module.modules())}

"""`xspecmesh convert-bpt`: the published pickled BPT checkpoint -> our safetensors checkpoint (read safely)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "convert-bpt",
        help="convert the published BPT checkpoint to safetensors",
        description="Read the published BPT checkpoint (bpt-8-16-500m.pt, a torch zip-format pickle whose 'model' "
        "entry is the state dict; a file holding the state dict itself also works) with a restricted unpickler "
        "that rebuilds tensors and nothing else, map its names to ours, check every name and shape, and write a "
        "safetensors checkpoint with the config embedded. Nothing from the file is ever executed.",
    )
    p.add_argument("src", nargs="?", metavar="SRC", help="the published .pt file")
    p.add_argument("dst", nargs="?", metavar="DST", help="the safetensors checkpoint to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", default="bpt", help="model configuration the file was trained with (default: bpt)")
    which.add_argument("--config", metavar="JSON", help="a model config JSON file (as ModelConfig.to_json writes) "
                       "instead of a preset")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="floating-point type of the written weights (default: float16)")
    p.add_argument("--ignore-foreign", action="store_true",
                   help="replace objects of other classes in the pickle (training arguments and the like) by inert "
                   "placeholders instead of refusing the file; still safe: their modules are never imported and "
                   "nothing of them is called, only the tensors are used")
    p.add_argument("--list-expected-keys", action="store_true",
                   help="print the published names and shapes expected for the configuration ('name [d0,d1]' "
                   "per line) and exit")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from xspecmesh.model.config import ModelConfig, preset
    from xspecmesh.errors import SettingsError

    if args.config is None:
        return preset(args.preset), args.preset
    try:
        return ModelConfig.from_json(Path(args.config).read_text()), "custom"
    except (OSError, TypeError, ValueError) as exc:
        raise SettingsError(f"cannot read model config {args.config}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from xspecmesh.model.convert_bpt import convert_bpt, expected_key_lines
    from xspecmesh.errors import SettingsError

    cfg, name = _config(args)
    if args.list_expected_keys:
        if args.src or args.dst:
            raise SettingsError("--list-expected-keys takes no SRC or DST")
        sys.stdout.write("\n".join(expected_key_lines(cfg)) + "\n")
        return 0
    if not (args.src and args.dst):
        raise SettingsError("convert-bpt needs SRC and DST (or --list-expected-keys)")
    done = convert_bpt(args.src, args.dst, cfg, dtype=args.dtype, ignore_foreign=args.ignore_foreign,
                       meta={"preset": name})
    if done.foreign:
        print(f"replaced {len(done.foreign)} foreign name(s) by inert placeholders (nothing ran): "
              f"{', '.join(done.foreign)}")
    print(f"wrote {done.path}: {done.tensors} tensors, {done.parameters / 1e6:.1f}M parameters in {args.dtype} "
          f"({name} config); ignored {done.ignored} published tensors BPT never runs")
    return 0

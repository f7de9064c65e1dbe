"""``robustedge import``: a foreign state dict written back as a self-describing RobustEdge checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustedge.cli.common import Defaults, add_model_facts, facts
from robustedge.errors import RobustEdgeError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn a foreign state dict into a RobustEdge checkpoint with its metadata",
                       description="Load a .pt/.pth/.safetensors state dict into a registry architecture (strictly, "
                                   "weights-only) and write it as a self-describing RobustEdge checkpoint, so eval, "
                                   "export, app and teachers need no --arch again.",
                       formatter_class=Defaults)
    p.add_argument("file", help="the foreign state dict (.pt, .pth, .safetensors)")
    p.add_argument("--out", required=True, help="the .safetensors checkpoint to write (never overwritten)")
    add_model_facts(p, dataset_and_eps=True)
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from robustedge.checkpoint import save_model
    from robustedge.loading import ROBUSTBENCH_PREFIX, load

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RobustEdgeError(f"--out must end in .safetensors, got {out.name}")
    if out.exists():
        raise RobustEdgeError(f"{out} exists; choose another --out (import never overwrites)")
    if not out.parent.is_dir():
        raise RobustEdgeError(f"folder {out.parent} does not exist")
    if args.file.startswith(ROBUSTBENCH_PREFIX) or args.arch is None:
        raise RobustEdgeError("import needs a state dict file and --arch (RobustBench models are loaded by name "
                              "wherever a model is taken)")
    model, meta = load(args.file, facts=facts(args), device="cpu")  # read to be written back
    if meta.extra.get("source", {}).get("kind") != "state dict":
        raise RobustEdgeError(f"{args.file} is already a RobustEdge checkpoint")
    save_model(out, model, meta, exclusive=True)  # another import to the same --out may have won meanwhile
    print(f"wrote {out} ({meta.spec.arch}, {meta.spec.num_classes} classes, {meta.spec.in_channels}x"
          f"{meta.spec.image_size}x{meta.spec.image_size}, dataset {meta.dataset}, eps {meta.eps})")
    return 0

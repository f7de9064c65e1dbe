"""Evaluation throughput: examples/s of PGD-20 and AutoAttack, batch size chosen to fit memory.

    python bench/eval.py                                          # the quickstart's students
    python bench/eval.py --checkpoint runs/x/best.safetensors --n 500 --attacks pgd20

For each checkpoint the suite runs twice on the same test examples, alternating ``--repeats``
times: the model as given (eval mode, NCHW), and ``fold_bn`` (conv+BN folded, channels_last),
which is what the quickstart and `robustedge eval --fold-bn` use. Batch size: ``auto``
(robustedge.suite.auto_batch_size: measured bytes per example against free memory). The
accuracies of both must agree (same function; checked to 1 example in n), the table gives the
median examples/s and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from robustedge.weights import load_model
    from robustedge.data import split_for_model
    from robustedge.eval_report import parse_attacks
    from robustedge.suite import auto_batch_size, evaluate
    from robustedge.models import fold_batchnorm
    from robustedge.runtime import resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append",
                   help="model file(s) (default: runs/quickstart/student_{bmtard,pgd_at}/best.safetensors)")
    p.add_argument("--n", type=int, default=200, help="test examples")
    p.add_argument("--attacks", default="pgd20,autoattack")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    checkpoints = args.checkpoint or [f"runs/quickstart/student_{m}/best.safetensors" for m in ("bmtard", "pgd_at")]
    missing = [c for c in checkpoints if not Path(c).exists()]
    if missing:
        p.error(f"not found: {', '.join(missing)} (run `robustedge quickstart` first, or pass --checkpoint)")
    attacks = [a for a in parse_attacks(args.attacks) if a != "clean"]
    print(f"device {device}, {torch.get_num_threads()} threads, n={args.n}, median of {args.repeats}")
    print("| model | attack | as given (ex/s) | folded + channels_last (ex/s) | speed-up | accuracy (%) | batch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in checkpoints:
        model, meta = load_model(path, device)
        split = split_for_model(meta, None, None, "test", args.n)
        x, y = split.float_images(device), split.labels.to(device)
        batch = {"plain": auto_batch_size(model.eval(), x[:1]),
                 "fold": auto_batch_size(fold_batchnorm(model).to(memory_format=torch.channels_last),
                                         x[:1].contiguous(memory_format=torch.channels_last))}
        for attack in attacks:
            rates: dict[str, list[float]] = {"plain": [], "fold": []}
            accuracy: dict[str, float] = {}
            for _ in range(args.repeats):
                for mode in ("plain", "fold"):
                    report = evaluate(model, x, y, attacks=[attack], eps=meta.eps, batch_size=batch[mode],
                                      show_progress=False, fold_bn=mode == "fold")
                    rates[mode].append(len(y) / report.seconds[attack])
                    accuracy[mode] = report.accuracy[attack]
            plain, fold = statistics.median(rates["plain"]), statistics.median(rates["fold"])
            agree = abs(accuracy["plain"] - accuracy["fold"]) <= 1 / len(y) + 1e-9
            print(f"| {Path(path).parent.name} ({meta.spec.arch}) | {attack} | {plain:.1f} | {fold:.1f} | "
                  f"{fold / plain:.2f}x | {100 * accuracy['fold']:.1f}{'' if agree else ' (MISMATCH)'} | "
                  f"{batch['fold']} |", flush=True)
            if not agree:
                print(f"accuracy differs: {accuracy}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

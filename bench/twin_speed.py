"""Speed of an INT8 file's differentiable twin: another checkout's ``OnnxTwin`` against this one's.

    git worktree add /tmp/before <commit>
    python bench/twin_speed.py bundle/model.int8.onnx --shape 1,8,8 --before /tmp/before

Times ``forward`` without gradients (what a query costs) and ``forward`` + the input gradient (one
step of a gradient attack) at each ``--batch``, one thread, the two twins alternating for ``--rounds``
rounds of ``--reps`` calls each (medians; a shared machine's drifting load then slows both alike).
Also checks that both compute the same logits and gradients bit for bit: a faster twin that computed
anything else would be worthless.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch


def load_twin_class(checkout: str):
    """``OnnxTwin`` from ``checkout``'s robustedge/edge/twin.py (it imports only robustedge.errors)."""
    spec = importlib.util.spec_from_file_location("twin_before", f"{checkout}/robustedge/edge/twin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OnnxTwin


def main(argv: list[str] | None = None) -> int:
    from robustedge.edge.twin import OnnxTwin

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", help="a QDQ INT8 ONNX file (a bundle's model.int8.onnx)")
    parser.add_argument("--shape", required=True, help="C,H,W of one input")
    parser.add_argument("--before", required=True, help="the checkout to compare with")
    parser.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    twins = {"before": load_twin_class(args.before)(args.onnx).eval(), "after": OnnxTwin(args.onnx).eval()}
    print(f"{args.onnx}: {twins['after'].op_counts}")
    print("| batch | pass | before (ms) | after (ms) | speed-up |\n|---:|---|---:|---:|---:|")
    for batch in (int(b) for b in args.batch.split(",")):
        x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))
        xg = x.clone().requires_grad_(True)
        with torch.no_grad():
            outputs = [twin(x) for twin in twins.values()]
        grads = [torch.autograd.grad(twin(xg).logsumexp(1).sum(), xg)[0] for twin in twins.values()]
        if not (torch.equal(*outputs) and torch.equal(*grads)):
            raise SystemExit(f"batch {batch}: the twins differ (logits {(outputs[0] - outputs[1]).abs().max():.3g}, "
                             f"gradients {(grads[0] - grads[1]).abs().max():.3g})")
        times = {(name, kind): [] for name in twins for kind in ("forward", "forward+grad")}
        for _ in range(args.rounds):
            for name, twin in twins.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    for _ in range(args.reps):
                        twin(x)
                    times[(name, "forward")].append((time.perf_counter() - start) / args.reps * 1e3)
                start = time.perf_counter()
                for _ in range(args.reps):
                    torch.autograd.grad(twin(xg).logsumexp(1).sum(), xg)
                times[(name, "forward+grad")].append((time.perf_counter() - start) / args.reps * 1e3)
        for kind in ("forward", "forward+grad"):
            before, after = statistics.median(times[("before", kind)]), statistics.median(times[("after", kind)])
            print(f"| {batch} | {kind} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The robustness suite (docs/design/evaluation.md, "Evaluation protocol"): runs the attacks of the report (robustedge/eval_report.py).

Step sizes (robustedge/attack_table.py) are stated relative to eps so that the protocol keeps its meaning at any eps: at
eps = 8/255 they are exactly the field's numbers (PGD_SAT 2/255 = eps/4, PGD_TRADES 0.003,
CW-inf 2/255). At a larger eps (digits), fixed 2/255 steps could not even reach the ball's
surface in 20 steps, which would overstate robustness.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch
from torch import nn

from robustedge.attacks import autoattack, check_eps
from robustedge.errors import RobustEdgeError
from robustedge.eval_report import SUITE, EvalReport, check_resumable, fingerprint, from_bits, to_bits
from robustedge.options import AUTOATTACK_BLOCK
from robustedge.verifier import check_finite


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def attack_bytes_per_example(model: nn.Module, example: torch.Tensor) -> int:
    """Memory one example costs in an attack pass (forward + input gradient).

    Measured, not guessed: every tensor autograd saves for the backward is counted for batches
    of 2 and 4; the difference is per-example (weights saved by the layers cancel out), and the
    output and input gradient add a few copies of the input.
    """
    counts = []
    for n in (2, 4):
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = example[:1].expand(n, *example.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        counts.append(total)
    return max(1, (counts[1] - counts[0]) // 2 + 4 * example[:1].numel() * example.element_size())


def auto_batch_size(model: nn.Module, example: torch.Tensor, *, cap: int = 1024, budget: float = 0.5) -> int:
    """The largest power of two (<= ``cap``) whose attack pass fits in ``budget`` of free memory.

    The per-example cost comes from :func:`attack_bytes_per_example`; backward workspaces make
    the peak up to about twice the saved activations, hence the 50% budget. On CUDA the choice is
    then tried for real and halved on out-of-memory.
    """
    device = example.device
    per_example = attack_bytes_per_example(model, example)
    fits = max(1, int(available_memory(device) * budget / (2 * per_example)))
    batch = 1 << min(int(math.log2(fits)), int(math.log2(max(1, cap))))
    if device.type == "cuda":
        while batch > 1:
            try:
                x = example[:1].expand(batch, *example.shape[1:]).clone().requires_grad_(True)
                with torch.enable_grad():
                    torch.autograd.grad(model(x).float().sum(), x)
                break
            except torch.cuda.OutOfMemoryError:
                batch //= 2
            finally:
                torch.cuda.empty_cache()
    return batch


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Logits in batches without gradients; NaN/Inf is an error, never an accuracy."""
    with torch.no_grad():
        logits = torch.cat([model(xb).float() for xb in x.split(batch_size)])
    if not torch.isfinite(logits).all():
        check_finite(logits.cpu().numpy(), f"the model ({what})")
    return logits


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Per-example correctness (bool) in batches, without gradients."""
    return _logits(model, x, batch_size, what).argmax(1) == y


def _clean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, world) -> torch.Tensor:
    """Per-example clean correctness, the examples sharded over the ranks of ``world`` like the attacks
    (each rank computes its blocks, not the whole set)."""
    from robustedge.sharding import run_sharded

    def block(start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"correct": _accuracy(model, x[start:stop], y[start:stop], batch_size, "clean inputs")}

    return run_sharded(block, len(y), batch_size, world=world, desc="clean", show_progress=False,
                       device=x.device)["correct"]


def _on_rank_zero(world, compute):
    """``compute()`` on rank 0 alone, its result handed to every rank (the flags: their checks are not
    sharded, and repeating them on every rank would only multiply the work)."""
    import torch.distributed as dist

    if world.size == 1:
        return compute()
    box = [compute() if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int,
               seed: int, aa_batch_size: int | None = None, show_progress: bool = False,
               world=None, first: int = 0, on_block=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example correctness, adversarial examples) of one suite attack, over the ranks of ``world``
    (robustedge/sharding.py; default: this process alone): the same numbers for any number of processes.

    White-box attacks start example ``i`` from its own seeded draw, so their results do not depend on the
    batch size either; AutoAttack runs on fixed blocks of ``aa_batch_size`` examples (default
    :data:`AUTOATTACK_BLOCK`, whatever ``batch_size`` is: pyautoattack reseeds each call and draws per batch,
    so its results depend on that block size, as the package's own do). ``first``/``on_block``: resume from
    example ``first`` and report each finished block (:func:`robustedge.sharding.run_sharded`); the outputs
    then cover ``[first, n)``."""
    from robustedge.sharding import World, example_uniform, run_sharded

    def block(start: int, stop: int) -> dict[str, torch.Tensor]:
        xb, yb = x[start:stop], y[start:stop]
        if name == "autoattack":
            x_adv, y_adv = autoattack(model, xb, yb, eps=eps, seed=seed, batch_size=stop - start)
            _logits(model, x_adv, batch_size, "AutoAttack's examples")
            return {"correct": y_adv.to(yb.device) == yb, "adv": x_adv}
        x_adv = SUITE[name].run(model, xb, yb, eps, example_uniform(tuple(x.shape[1:]), seed, start, stop, x.device,
                                                                    x.dtype))
        return {"correct": _accuracy(model, x_adv, yb, batch_size, f"{name} examples"), "adv": x_adv}

    size = (aa_batch_size or AUTOATTACK_BLOCK) if name == "autoattack" else batch_size
    out = run_sharded(block, len(y), size, world=world or World(), desc=name, show_progress=show_progress,
                      device=x.device, first=first, on_block=on_block)
    if not out:  # nothing left to run
        return torch.zeros(0, dtype=torch.bool, device=x.device), x[:0]
    return out["correct"], out["adv"]


def _flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, results: dict, pgd20: torch.Tensor | None,
           settings, seed: int, batch_size: int) -> tuple[list[dict], dict]:
    """Attack-failure flags of an evaluation on the first ``settings.n`` examples: the gradient checks
    (robustedge/flags.py), and, when an iterative attack is reported, black-box Square against it and
    PGD-100 against its per-example worst case (never against FGSM, nor against this Square)."""
    import numpy as np

    from robustedge.runners import TorchRunner
    from robustedge.flags import gradient_flags, model_correct, square_examples
    from robustedge.verifier import comparison_flags, reported_worst

    n = min(settings.n, len(y))
    if pgd20 is None and "pgd20" in results:  # a resumed run: the same examples again (per-example seeds)
        pgd20 = run_attack("pgd20", model, x[:n], y[:n], eps, batch_size, seed)[1]
    compared = {("clean" if k == "clean" else f"whitebox_{k}"): v[:n].cpu().numpy() for k, v in results.items()}
    reported = reported_worst(compared)
    flags, checks = [], {}
    if reported is not None:
        first = {"x": x[:n].cpu().numpy().astype(np.float32), "y": y[:n].cpu().numpy().astype(np.int64)}
        square = square_examples(TorchRunner(model), first, eps, n, settings.square_queries, seed)
        compared["square"] = model_correct(model)(torch.from_numpy(square).to(x.device), y[:n])
        flags = comparison_flags(compared, settings.tolerance)
        checks["square_accuracy"] = float(compared["square"].mean())
    more, info = gradient_flags(model, x, y, eps, model_correct(model), settings, seed, pgd20, reported)
    return flags + more, info | checks


def _weak_attack_notes(attacks: list[str]) -> list[str]:
    ran = [a for a in attacks if a != "clean"]
    if not ran or any(SUITE[a].iterative for a in ran):
        return []
    return [f"{', '.join(ran)} alone is a weak attack (one step): its accuracy is an upper bound on robustness, "
            f"far above PGD-20's or AutoAttack's; add pgd20 or autoattack for a number to report"]


def _run_flags(report: EvalReport, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, results: dict,
               pgd20: torch.Tensor | None, settings, seed: int, batch_size: int, world) -> None:
    """The checks within their budget (robustedge/flags.py, :func:`checks_budget_n`), into ``report``."""
    from dataclasses import replace

    from robustedge.flags import check_passes, checks_budget_n

    settings.validate()
    ran = [a for a in results if a != "clean"]
    if not ran:
        report.checks = {"skipped": "no robustness attack ran"}
        return
    judged = any(SUITE[a].iterative for a in ran)
    per_example = check_passes(settings, pgd20_given="pgd20" in ran, judge_reported=judged)
    suite = report.suite_passes()
    if min(settings.n, len(y)) < settings.min_n:
        report.checks = {"skipped": f"fewer than {settings.min_n} examples to check (--flags-n {settings.n}, "
                                    f"{len(y)} evaluated): too few to judge"}
        return
    n = checks_budget_n(settings, len(y), suite, per_example)
    if n == 0:
        report.checks = {"skipped": f"on at least {settings.min_n} examples they would cost more than "
                                    f"{settings.budget:g} x this suite's {suite:.0f} model passes "
                                    f"({per_example:.0f} per example); --flags-budget allows more"}
        return
    start = time.perf_counter()
    report.flags, report.checks = _on_rank_zero(
        world, lambda: _flags(model, x, y, eps, results, pgd20, replace(settings, n=n), seed, batch_size))
    report.checks |= {"n": n, "passes": n * per_example, "suite_passes": suite}
    report.seconds["flags"] = time.perf_counter() - start


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attacks: list[str], eps: float,
             batch_size: int | str = 256, seed: int = 0, aa_batch_size: int | None = AUTOATTACK_BLOCK,
             show_progress: bool = True, fold_bn: bool = False,
             adversarial_out: dict[str, torch.Tensor] | None = None, flags=None,
             distributed: bool = False, resume: EvalReport | None = None,
             on_update: Callable[[EvalReport], None] | None = None, save_every: float = 2.0) -> EvalReport:
    """Run the suite on (x, y) already on the model's device; the model is put in eval mode.

    ``fold_bn`` attacks a conv+BN-folded copy in channels_last layout (the same function to ~1e-6;
    on a 2-core CPU AutoAttack on 200 digits of the quickstart student takes 43 s instead of 111 s
    unfolded (bench/RESULTS.md), and
    MobileNetV2's depthwise convolutions gain most); off by default so results are bit-for-bit
    those of the model as given.
    ``batch_size='auto'`` picks the largest that fits memory (:func:`auto_batch_size`); attacks are
    per-example, so the batch size changes speed, not results. AutoAttack runs on blocks of ``aa_batch_size``
    (default :data:`AUTOATTACK_BLOCK`, independent of ``batch_size``; None means that default).
    ``adversarial_out``, when given, receives each attack's adversarial examples (for reuse, e.g.
    as transfer examples when verifying an export).
    ``flags`` (a :class:`robustedge.flags.FlagSettings`) runs the attack-failure checks; the report's
    ``flags`` then lists those that fired and ``worst`` is the per-example worst case over the attacks.
    ``distributed`` shards the examples over the ranks of the initialised process group (every rank must
    call this, with the same inputs; robustedge/sharding.py); off, this process evaluates alone.
    ``on_update(report)`` receives the unfinished report after each attack and, at most every ``save_every``
    seconds, after a block (``report.complete`` False, ``report.partial`` the attack under way):
    saving it lets ``resume`` continue a killed evaluation from its last finished attack and block, with the
    same per-example results as an uninterrupted run (:func:`check_resumable` refuses another run's report).
    """
    eps = check_eps(eps)
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise RobustEdgeError(f"batch size must be an integer >= 1 or 'auto', got {batch_size!r}")
    if len(y) == 0:
        raise RobustEdgeError("nothing to evaluate: no examples")
    if aa_batch_size is None:
        aa_batch_size = AUTOATTACK_BLOCK
    if isinstance(aa_batch_size, bool) or not isinstance(aa_batch_size, int) or aa_batch_size < 1:
        raise RobustEdgeError(f"AutoAttack batch size must be an integer >= 1, got {aa_batch_size!r}")
    if flags is not None:
        flags.validate()
    original, was_training = model, model.training
    model.eval()
    from robustedge.models import fold_if_possible

    if fold_bn:
        folded = fold_if_possible(model)  # others (QAT students, foreign modules) are attacked as given
        if folded is not model:
            model = folded.to(memory_format=torch.channels_last)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
    from robustedge.sharding import World, agree_min

    world = World.current() if distributed else World()
    if batch_size == "auto":
        batch_size = agree_min(auto_batch_size(model, x[:1]), world)  # the same blocks on every rank
    run = {"attacks": list(attacks), "n": int(len(y)), "eps": eps, "seed": seed, "aa_batch_size": aa_batch_size,
           "fold_bn": fold_bn, "device": x.device.type} | fingerprint(original, x, y)
    if resume is not None:
        try:
            check_resumable(resume, run)
            if adversarial_out is not None:
                raise RobustEdgeError("a resumed evaluation cannot return the adversarial examples of attacks it did "
                                      "not run again; do not pass adversarial_out with resume")
        except RobustEdgeError:
            original.train(was_training)
            raise
        if resume.complete:
            original.train(was_training)
            return resume
    report = EvalReport(n=int(len(y)), eps=eps, info={"fold_bn": fold_bn, "batch_size": batch_size,
                                                      "aa_batch_size": aa_batch_size, "processes": world.size,
                                                      "run": run}, complete=False)
    results, examples = {}, {}
    last_save = [time.perf_counter()]

    def update(force: bool) -> None:
        if on_update is not None and world.main and (force or time.perf_counter() - last_save[0] >= save_every):
            on_update(report)
            last_save[0] = time.perf_counter()

    try:
        classes = _logits(model, x[:1], 1, "clean inputs").shape[1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise RobustEdgeError(f"labels must be class indices in [0, {classes - 1}] (the model predicts {classes} "
                                  f"classes), got {int(y.min())}..{int(y.max())}")
        results["clean"] = _clean(model, x, y, batch_size, world)  # also refuses NaN/Inf logits
        for name in attacks:
            start = time.perf_counter()
            if resume is not None and len(resume.correct.get(name, "")) == len(y) and name in resume.accuracy:
                results[name] = from_bits(resume.correct[name], x.device)  # finished before: kept as it was
                report.seconds[name] = resume.seconds.get(name, 0.0)
            elif name != "clean":
                partial = resume.partial if resume is not None and resume.partial else {}
                done = partial.get("correct", "") if partial.get("attack") == name else ""
                before = float(partial.get("seconds", 0.0)) if done else 0.0
                prefix = [from_bits(done, x.device)] if done else []

                def on_block(stop: int, out: dict, name=name, prefix=prefix, start=start, before=before) -> None:
                    prefix.append(out["correct"].to(x.device))
                    report.partial = {"attack": name, "correct": to_bits(torch.cat(prefix)),
                                      "seconds": before + time.perf_counter() - start}
                    update(False)

                correct, adv = run_attack(name, model, x, y, eps, batch_size, seed, aa_batch_size, show_progress,
                                          world, first=len(done), on_block=on_block)
                results[name] = torch.cat([from_bits(done, x.device), correct]) if done else correct
                if not done:
                    examples[name] = adv
                report.seconds[name] = before + time.perf_counter() - start
            else:
                report.seconds[name] = time.perf_counter() - start
            report.accuracy[name] = float(results[name].float().mean())
            report.correct[name] = to_bits(results[name])
            report.partial = None
            update(True)
        if adversarial_out is not None:
            adversarial_out.update(examples)
        if len(results) > 2:
            report.worst = float(torch.stack(list(results.values())).all(0).float().mean())
        report.notes = _weak_attack_notes(attacks)
        if flags is not None and eps == 0:
            report.checks = {"skipped": "eps is 0: there is no attack to check"}
        if flags is not None and eps > 0:
            _run_flags(report, model, x, y, eps, results, examples.get("pgd20"), flags, seed, batch_size, world)
        report.complete = True
    finally:
        original.train(was_training)
    return report

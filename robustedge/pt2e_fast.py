"""Two slow spots of torchao's PT2E flow, made fast without changing what they compute.

Measured on the digits MobileNetV2 (width 0.25) on the 2-core build CPU with torchao 0.18:

- preparing a QAT graph took about 9 s, 6 s of it in ``find_sequential_partitions``, which the x86
  quantizer calls for patterns such as [conv, batch norm, add, ReLU]: it builds the Cartesian product of
  every partition of each type (about a million tuples for MobileNetV2) and then keeps the connected
  ones. :func:`sequential_partitions` extends only connected prefixes, which yields the same tuples in
  the same order (the product's order is lexicographic, and a tuple is kept exactly when each
  consecutive pair is connected);
- converting took about 12 s, 9 s of it in the conv-bn fold tracing its 24 patterns for ``conv1d``,
  ``conv_transpose1d`` and ``conv_transpose2d`` with ``torch.export``, in a graph that holds only
  ``conv2d``. A pattern built on an operator the graph lacks cannot match, so the fold for that kind is
  skipped, as long as the fold of a kind the graph has still runs (the fold also rewrites the
  dequantize nodes around every match, and those rewrites must happen once).

:func:`faster_pt2e` applies both for the duration of a ``with`` block, and only on the torchao versions
the tests proved them on (:data:`PROVEN_TORCHAO`): tests/test_qat.py compares the partitions, the
prepared graph's code and the converted model's outputs bit for bit against torchao's own functions.
On another version nothing is patched and the flow is torchao's, only slower.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Callable, Iterator

from robustedge.errors import RobustEdgeError

PROVEN_TORCHAO = ("0.18.",)
SWITCH = "ROBUSTEDGE_PT2E_FAST"


def sequential_partitions(gm, partition_types: list[Any], include_functional_equivalent: bool = True,
                          filter_fn: Callable | None = None) -> list[tuple]:
    """torchao's ``find_sequential_partitions`` (same arguments, same result, same order) without the
    Cartesian product."""
    from torchao.quantization.pt2e import graph_utils

    if not graph_utils._valid_type_sequence(partition_types):
        raise ValueError(f"Invalid partition types: {partition_types}. Each type in the sequence must be unique")
    levels = []
    for partition_type in partition_types:
        partitions = graph_utils.get_source_partitions(gm.graph, graph_utils._get_matching_types(partition_type),
                                                       filter_fn)
        levels.append(list(itertools.chain.from_iterable(partitions.values())))
    found: list[tuple] = []

    def extend(prefix: tuple) -> None:
        if len(prefix) == len(levels):
            found.append(prefix)
            return
        for candidate in levels[len(prefix)]:
            if not prefix or graph_utils.check_subgraphs_connected(prefix[-1], candidate):
                extend(prefix + (candidate,))

    extend(())
    return found


def _conv_kinds():
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    return {F.conv1d: aten.conv1d, F.conv2d: aten.conv2d, F.conv_transpose1d: aten.conv_transpose1d,
            F.conv_transpose2d: aten.conv_transpose2d}


def _packets(graph) -> set:
    return {getattr(node.target, "overloadpacket", None) for node in graph.nodes if node.op == "call_function"}


def _fold_present_convs_only(helper: Callable) -> Callable:
    kinds = _conv_kinds()

    def fold(m, conv_fn, example_inputs, is_cuda):
        present = _packets(m.graph)
        if conv_fn in kinds and kinds[conv_fn] not in present and any(p in present for p in kinds.values()):
            return m  # no pattern of this kind can match, and a kind that can will run the fold
        return helper(m, conv_fn, example_inputs, is_cuda)

    fold.robustedge_fast = True  # type: ignore[attr-defined]
    return fold


def fast_paths_enabled() -> bool:
    """``ROBUSTEDGE_PT2E_FAST``: unset, empty or 1 on, 0 off; any other value is refused (the CLI checks
    it before a command starts, so a typo never passes for one setting or the other)."""
    value = (os.environ.get(SWITCH) or "1").strip()
    if value not in ("0", "1"):
        raise RobustEdgeError(f"{SWITCH} must be 0 (torchao's own path) or 1 (the fast paths), got {value!r}")
    return value == "1"


def torchao_version() -> str:
    try:
        import torchao
    except ImportError:
        return ""
    return str(getattr(torchao, "__version__", ""))


@contextlib.contextmanager
def faster_pt2e() -> Iterator[bool]:
    """Within the block, torchao's x86 annotation and conv-bn fold take the fast paths above; yields
    whether they were applied (False on an unproven torchao version, with torchao missing, or with
    ``ROBUSTEDGE_PT2E_FAST=0`` in the environment, which bench/pt2e_fast.py uses to time torchao as is)."""
    if not fast_paths_enabled() or not torchao_version().startswith(PROVEN_TORCHAO):
        yield False
        return
    from torchao.quantization.pt2e import graph_utils, qat_utils
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer

    patches = []
    if x86_inductor_quantizer.find_sequential_partitions is graph_utils.find_sequential_partitions:
        patches.append((x86_inductor_quantizer, "find_sequential_partitions", sequential_partitions))
    helper = qat_utils._fold_conv_bn_qat_helper
    if not getattr(helper, "robustedge_fast", False):
        patches.append((qat_utils, "_fold_conv_bn_qat_helper", _fold_present_convs_only(helper)))
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, replacement in patches:
            setattr(module, name, replacement)
        yield True
    finally:
        for module, name, original in originals:
            setattr(module, name, original)

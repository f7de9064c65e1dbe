"""An exact differentiable twin of an exported ONNX file, so white-box attacks can see the artifact.

Attacks crafted on the float model transfer poorly to its INT8 version (Bernhard et al. 2019), so
"robust after quantisation" must be measured by attacking the quantised function itself. ONNX
Runtime gives no gradients; this module rebuilds the file's graph in torch from the file alone (its
int8 weights, scales, zero points and nodes) and computes the same function:

- ``QuantizeLinear``: ``saturate(round_half_to_even(x / scale) + zero_point)`` per tensor or per axis,
  exactly as the ONNX specification defines it; ``DequantizeLinear``: ``(q - zero_point) * scale``;
- every other node (Conv, Gemm, Add, ...) in float, on the dequantised values, which is the QDQ
  format's reference semantics;
- gradients: straight-through for the rounding (the derivative of the line it approximates) and the
  true derivative (zero) where the quantiser saturates.

Speed (issue 24): ``forward`` is not a node-by-node interpreter any more. At load, constant
sub-expressions (the int8 weights through their DequantizeLinear, biases) are evaluated once, every
QuantizeLinear -> DequantizeLinear pair of an activation becomes one fake-quantise step, and the graph
is compiled into a flat list of steps whose attributes are parsed once and whose values live in
numbered slots (no dictionary lookups, no attribute parsing, intermediates freed after their last
use). Outputs are bit-identical to the node-by-node interpretation of the file
(tests/test_whitebox.py).
Query-only attacks do not use the twin at all: they ask the runtime (robustedge/runners.py,
``QueriedTwin``).

ONNX Runtime runs fused integer kernels instead (``QLinearConv`` etc.: int32 accumulation, then a
float requantisation multiplier), so the float emulation above differs from it by one quantisation
step where a value lands within float rounding of a .5 boundary: enough, on a full-width MobileNetV2,
to keep the twin below the export's agreement threshold. By default (``kernels="onnxruntime"``) the
quantised Conv/Gemm steps and ReduceMean compute the runtime's arithmetic bit for bit instead
(:mod:`robustedge.edge.ort_arithmetic`); ``kernels="reference"`` (and every float64 twin) keeps the
format's float semantics. :func:`agreement` measures what is left; white-box numbers are refused
when the twin disagrees with the runtime beyond a stated tolerance (docs/design/whitebox.md,
"White-box robustness of the artifact").
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustedge.edge import ort_arithmetic
from robustedge.edge.onnx_ops import OPS, _attrs, _qrange
from robustedge.errors import RobustEdgeError

class _FakeQuantize(torch.autograd.Function):
    """:class:`_QuantizeSTE` with ``dequantize`` for a constant per-tensor scale and zero point, with
    everything that does not depend on ``x`` worked out once at load: four kernels forward (six before,
    eleven with the gradient mask and the zero point's tensor arithmetic), one fused kernel backward (two
    before, one of them a slow bool-to-float conversion).

    Values: ``round(x / scale) + zp`` clamped to ``[qmin, qmax]`` minus ``zp`` equals ``round(x / scale)``
    clamped to ``[qmin - zp, qmax - zp]`` (integers, exact in float below 2**24, and beyond that both
    saturate), so they are bit-identical to QuantizeLinear -> DequantizeLinear. The division stays a
    division by a tensor: not a multiplication by ``1 / scale``, nor
    ``torch.fake_quantize_per_tensor_affine``, which multiplies by the reciprocal and can round a value on
    a .5 boundary the other way, and whose CPU kernel measured 6-14x slower than these four kernels.

    Gradient: ``grad`` where ``lo <= x / scale <= hi`` (``round(q) + zp`` inside the range, as
    :class:`_QuantizeSTE`), else 0. Instead of a saved bool mask it keeps ``q`` and asks
    ``hardtanh_backward``, which passes ``grad`` where ``open_lo < q < open_hi`` strictly: with the bounds
    moved one representable step outwards in ``q``'s dtype (``open_lo``, ``open_hi``), that is exactly
    ``lo <= q <= hi``. (``q`` is a float per value where the mask was a byte: for the backward pass
    each such step now holds about as much as a convolution holds for its input.)"""

    @staticmethod
    def forward(ctx, x, scale, open_lo: float, open_hi: float, qlo: float, qhi: float):
        q = x / scale
        if not ctx.needs_input_grad[0]:
            return q.round_().clamp_(qlo, qhi).mul_(scale)  # a fresh tensor: in place is safe here
        ctx.save_for_backward(q)
        ctx.bounds = open_lo, open_hi
        return q.round().clamp_(qlo, qhi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, q, *ctx.bounds), None, None, None, None, None


def _open_bounds(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float] | None:
    """``(lo, hi)`` moved one representable step outwards in ``dtype``, or None where ``dtype`` cannot
    hold them exactly (never for float32/64 and the integer + 0.5 bounds of 8- and 16-bit ranges)."""
    lo_t, hi_t = torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)
    if float(lo_t) != lo or float(hi_t) != hi:
        return None
    return (float(torch.nextafter(lo_t, torch.tensor(-float("inf"), dtype=dtype))),
            float(torch.nextafter(hi_t, torch.tensor(float("inf"), dtype=dtype))))



def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype
                                         and a.shape == b.shape and torch.equal(a, b))


def _fuse_quantize_dequantize(nodes: list, consts: dict) -> list:
    """QuantizeLinear -> DequantizeLinear with the same constant scale, zero point and axis, where the
    quantised tensor has no other use, becomes one fake-quantise node: the same values, half the
    interpreter steps and a fused in-place kernel chain."""
    users: dict[str, int] = {}
    for _, _, inputs, _ in nodes:
        for name in inputs:
            users[name] = users.get(name, 0) + 1
    producer = {outs[0]: i for i, (op, _, _, outs) in enumerate(nodes) if op == "QuantizeLinear"}
    fused, dropped = list(nodes), set()
    for i, (op, attrs, inputs, outputs) in enumerate(nodes):
        if op != "DequantizeLinear" or inputs[0] not in producer or users.get(inputs[0]) != 1:
            continue
        j = producer[inputs[0]]
        q_attrs, q_inputs = nodes[j][1], nodes[j][2]
        params = [consts.get(name) if name else None for name in q_inputs[1:3]]
        mine = [consts.get(name) if name else None for name in inputs[1:3]]
        if len(params) == 2 and len(mine) == 2 and all(_same(a, b) for a, b in zip(params, mine)) \
                and q_attrs.get("axis", 1) == attrs.get("axis", 1) and params[0] is not None:
            fused[i] = ("FakeQuantize", q_attrs, q_inputs, outputs)
            dropped.add(j)
    return [_prepared(node, consts) for k, node in enumerate(fused) if k not in dropped]


def _prepared(node: tuple, consts: dict) -> tuple:
    """A quantise node with a constant per-tensor scale and zero point, with both converted once to
    float and its integer range worked out once (instead of at every forward)."""
    op, attrs, inputs, outputs = node
    if op not in ("QuantizeLinear", "FakeQuantize") or inputs[1] not in consts:
        return node
    scale = consts[inputs[1]]
    zp = consts.get(inputs[2]) if len(inputs) > 2 and inputs[2] else None
    if scale.numel() != 1 or (len(inputs) > 2 and inputs[2] and zp is None):
        return node
    names = [f"{outputs[0]}::scale", f"{outputs[0]}::zero_point"]
    consts[names[0]] = scale.reshape(()).float()
    consts[names[1]] = (zp if zp is not None else torch.zeros(())).reshape(()).float()
    return op, attrs | {"qrange": _qrange(zp)}, [inputs[0]] + names, outputs


def _fake_quantize_step(attrs: dict, inputs: list, consts: dict, dtype: torch.dtype
                        ) -> tuple[Callable, list] | None:
    """A prepared per-tensor fake-quantise node as a step on (x, scale), or None (the generic rule)."""
    if "qrange" not in attrs:
        return None
    qmin, qmax = attrs["qrange"]
    zp = float(consts[inputs[2]])
    bounds, qlo, qhi = _open_bounds(qmin - 0.5 - zp, qmax + 0.5 - zp, dtype), qmin - zp, qmax - zp
    if bounds is None:
        return None

    def fake_quantize(x, scale):
        if x.requires_grad:
            return _FakeQuantize.apply(x, scale, *bounds, qlo, qhi)
        return (x / scale).round_().clamp_(qlo, qhi).mul_(scale)  # no graph to record: no Function call
    return fake_quantize, inputs[:2]


def _conv_step(attrs: dict, inputs: list, consts: dict) -> tuple[Callable, list] | None:
    """A Conv with a constant weight as a step with its attributes parsed once, or None."""
    w = consts.get(inputs[1])
    if w is None or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None  # the generic rule decides (and refuses auto_pad)
    dims = w.dim() - 2
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    pre_pad = []
    if pads[:dims] != pads[dims:]:
        for begin, end in reversed(list(zip(pads[:dims], pads[dims:]))):
            pre_pad += [begin, end]
        pads = [0] * (2 * dims)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    stride, padding = list(attrs.get("strides", [1])), pads[:dims]
    dilation, groups = list(attrs.get("dilations", [1])), attrs.get("group", 1)

    if pre_pad:
        def step(x, w, b=None):
            return conv(F.pad(x, pre_pad), w, b, stride, padding, dilation, groups)
    else:
        def step(x, w, b=None):
            return conv(x, w, b, stride, padding, dilation, groups)
    return step, inputs


_ELEMENTWISE = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
                "Relu": torch.relu}


def _integer_step(op: str, attrs: dict, inputs: list, consts: dict, dtype: torch.dtype) -> tuple[Callable, list]:
    """An ``IntegerConv``/``IntegerGemm`` node (:mod:`robustedge.edge.ort_arithmetic`) as a step: its
    float Conv/Gemm and output fake-quantiser are the gradient's path."""
    if op == "IntegerConv":
        float_step = _conv_step(attrs, inputs[:3], consts)[0]
    else:
        float_step = functools.partial(ort_arithmetic.gemm, transposed=bool(attrs.get("transB", 0)))
    quantiser = None
    if attrs["requantize"] is not None:
        quantiser = _fake_quantize_step(attrs["surrogate_quantiser"], [None, *inputs[-2:]], consts, dtype)
        if quantiser is None:
            raise RobustEdgeError(f"{op}: the twin cannot bound its output's quantiser")
    return ort_arithmetic.integer_step(op, attrs, float_step, quantiser and quantiser[0]), inputs


def _step(op: str, attrs: dict, inputs: list, consts: dict, dtype: torch.dtype) -> tuple[Callable, list]:
    """One node as (a function of its input tensors alone, the input names it reads): the fast rules
    for what small CNNs are made of, and the generic rule of :data:`OPS` with the attributes bound."""
    if op in ("IntegerConv", "IntegerGemm"):
        return _integer_step(op, attrs, inputs, consts, dtype)
    if op == "FakeQuantize":
        step = _fake_quantize_step(attrs, inputs, consts, dtype)
        if step is not None:
            return step
    elif op == "Conv":
        step = _conv_step(attrs, inputs, consts)
        if step is not None:
            return step
    elif op in _ELEMENTWISE:
        return _ELEMENTWISE[op], inputs
    elif op == "ReduceMean" and attrs.get("kernels") == "onnxruntime":
        return functools.partial(ort_arithmetic.reduce_mean, attrs), inputs
    return functools.partial(OPS[op], attrs), inputs


def _compile(nodes: list, constants: list[str], input_name: str, output_name: str, consts: dict,
             dtype: torch.dtype, where: str) -> tuple[list, int, int]:
    """The nodes as a flat program over numbered slots: ``(steps, slots, output slot)``.

    Slots ``0 .. len(constants) - 1`` hold the module's buffers in registration order, then the input,
    then a slot that is always None (an omitted optional input), then one slot per node output. Each
    step is ``(function, input slots, output slot, slots to free)``: a value is dropped after its last
    use, so a forward without gradients holds only what is still needed."""
    slot = {name: i for i, name in enumerate(constants)}
    slot[input_name] = len(slot)
    none_slot = len(slot)
    steps, reads = [], []
    for op, attrs, inputs, outputs in nodes:
        fn, names = _step(op, attrs, inputs, consts, dtype)
        missing = [n for n in names if n and n not in slot]
        if missing:
            raise RobustEdgeError(f"{where}: the twin cannot compute '{missing[0]}' (read by an {op} node)")
        ins = tuple(slot[n] if n else none_slot for n in names)
        slot[outputs[0]] = none_slot + 1 + len(steps)
        steps.append((fn, ins, slot[outputs[0]]))
        reads.append(ins)
    if output_name not in slot:
        raise RobustEdgeError(f"{where}: the twin cannot compute the output '{output_name}'")
    out, first_free = slot[output_name], none_slot + 1
    last_use = {}
    for index, ins in enumerate(reads):
        for i in ins:
            if i >= first_free:
                last_use[i] = index
    frees = [[] for _ in steps]
    for i, index in last_use.items():
        if i != out:
            frees[index].append(i)
    program = [(fn, ins, o, tuple(frees[k])) for k, (fn, ins, o) in enumerate(steps)]
    return program, first_free + len(steps), out


#: how the twin computes a quantised Conv/Gemm: ``reference``, the QDQ format's float semantics
#: (dequantise, compute in float, quantise); ``onnxruntime``, the integer arithmetic of ONNX Runtime's
#: CPU kernels bit for bit (:mod:`robustedge.edge.ort_arithmetic`), the runtime the INT8 files run on
KERNELS = ("onnxruntime", "reference")


class OnnxTwin(nn.Module):
    """The function of an ONNX file (fp32 or QDQ INT8) as a differentiable torch module.

    Constant sub-expressions (int8 weights through their DequantizeLinear, biases) are evaluated once
    at load; the remaining nodes, in the file's (topological) order, are compiled into a flat program
    of steps (:func:`_compile`) that ``forward`` runs.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, kernels: str = "onnxruntime") -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        self.path = Path(path)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
            raise RobustEdgeError(f"{Path(path).name} is not a readable ONNX file: {type(exc).__name__}") from None
        graph = model.graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise RobustEdgeError(f"{self.path.name}: the twin needs one input and one output")
        self.input_name, self.output_name, self.dtype = inputs[0], graph.output[0].name, dtype
        if kernels not in KERNELS:
            raise RobustEdgeError(f"unknown twin kernels '{kernels}'; choose from {', '.join(KERNELS)}")
        self.kernels = kernels
        consts: dict[str, torch.Tensor] = {}
        integers: dict[str, ort_arithmetic.IntegerConstant] = {}
        for init in graph.initializer:
            consts[init.name] = self._tensor(numpy_helper.to_array(init))
        self.nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                consts[node.output[0]] = self._tensor(numpy_helper.to_array(_attrs(node)["value"]))
                continue
            if node.op_type not in OPS:
                raise RobustEdgeError(f"{self.path.name}: the twin has no rule for ONNX op '{node.op_type}' "
                                      f"(node {node.name}); white-box attacks cannot be run on this file")
            args = [consts.get(i) if i else None for i in node.input]
            if node.input and all(a is not None or not i for a, i in zip(args, node.input)):
                with torch.no_grad():  # weights and biases: folded once
                    outs = OPS[node.op_type](_attrs(node), *args)
                if node.op_type == "DequantizeLinear":
                    integer = ort_arithmetic.integer_constant(_attrs(node), *args, *[None] * (3 - len(args)))
                    if integer is not None:
                        integers[node.output[0]] = integer
                for name, value in zip(node.output, outs if isinstance(outs, tuple) else (outs,)):
                    consts[name] = value
                continue
            self.nodes.append((node.op_type, _attrs(node), list(node.input), list(node.output)))
        self.nodes = _fuse_quantize_dequantize(self.nodes, consts)
        if kernels == "onnxruntime" and dtype == torch.float32:
            self.nodes = ort_arithmetic.rewrite(self.nodes, consts, integers)
        used = {i for _, _, ins, _ in self.nodes for i in ins} | {self.output_name}
        self._names = sorted(k for k in consts if k in used)
        for index, name in enumerate(self._names):
            self.register_buffer(f"c{index}", consts[name], persistent=False)
        self.op_counts = {}
        for op, *_ in self.nodes:
            self.op_counts[op] = self.op_counts.get(op, 0) + 1
        self._program, self._slots, self._output_slot = _compile(
            self.nodes, self._names, self.input_name, self.output_name, consts, dtype, self.path.name)
        self._blank = [None] * (self._slots - len(self._names) - 1)  # the None slot and the node outputs

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(array, copy=True))
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @property
    def is_quantized(self) -> bool:
        return "QuantizeLinear" in self.op_counts or "FakeQuantize" in self.op_counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the buffers are exactly the constants, registered in slot order (and kept in it by .to())
        env = [*self._buffers.values(), x.to(self.dtype), *self._blank]
        for fn, ins, out, free in self._program:
            env[out] = fn(*[env[i] for i in ins])
            for i in free:
                env[i] = None
        return env[self._output_slot].float()


def agreement(twin: nn.Module, runner, x: np.ndarray, batch_size: int = 256) -> dict:
    """Top-1 agreement and max |logit difference| of the twin against the runtime on ``x``."""
    from robustedge.verifier import predict

    from robustedge.runners import model_device

    runtime = predict(runner, x, batch_size, what="the runtime")
    device = model_device(twin)
    with torch.no_grad():
        mine = torch.cat([twin(torch.from_numpy(x[i:i + batch_size]).to(device)).cpu()
                          for i in range(0, len(x), batch_size)]).numpy()
    return {"agreement": float((runtime.argmax(1) == mine.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(runtime - mine).max()), "n": int(len(x))}

"""The twin's convolutions and matrix products in ONNX Runtime's integer arithmetic, bit for bit.

Why: the QDQ file's reference semantics (dequantise, convolve in float, quantise) and what ONNX
Runtime's CPU provider runs (``QLinearConv``/``QGemm``: an exact int32 sum of integer products, then
one float multiplier per output channel) round differently whenever a float sum lands within a few
ulps of a .5 boundary. On the 8x8 digits student that almost never changes a prediction; on a full
width MobileNetV2 at 32x32 (57 quantised convolutions) the one-step differences pile up and the
float twin agreed with the runtime on only 97.9% of adversarial examples, below the 99% the export
needs before it reports a white-box number (docs/design/whitebox.md). Adversarial examples sit on
decision boundaries by construction, so that is where any rounding difference shows.

This module rewrites, at load, each ``FakeQuantize(x) -> Conv|Gemm(x, DQ(int8 w), DQ(int32 b)) ->
FakeQuantize(y)`` chain into one step whose *value* is the runtime's:

- ``acc = sum((q_x - zp_x) * (q_w - zp_w)) + q_b``, exact as MLAS's int32 kernels compute it: in
  float32 where no partial sum can reach 2**24 (most layers; float32 speed), else in float64;
- ``q_y = saturate(round_half_even(float32(acc) * m) + zp_y)`` with ``m = float32(float32(s_x * s_w)
  / s_y)`` per output channel: onnxruntime's ``QLinearConv``/``QGemm`` compute the multiplier in
  this order (``output_scales[i] = X_scale * W_scale[i] / Y_scale``, onnxruntime
  ``core/providers/cpu/quantization/qlinearconv.cc``) and MLAS's ``MlasRequantizeOutput`` applies
  it with ``cvtepi32_ps``, ``mulps`` and ``cvtps_epi32`` (round half to even);

and whose *gradient* is the float chain's (the straight-through fake-quantised convolution the twin
always used): the exact path runs without a graph.

``QLinearAdd`` needs no rewrite: MLAS's AVX2 kernel (``QLinearBinaryOpKernelAvx2.S``) computes
``(float((q_a - zp_a)) * s_a + float((q_b - zp_b)) * s_b) / s_c`` rounded half to even, which is
the reference semantics the twin already follows. What this module does not cover (a float
``ReduceMean`` between DQ and Q, other runtimes' requantisation, AVX2 machines without VNNI whose
u8s8 kernels saturate int16 pair sums) stays as it was; :func:`robustedge.edge.twin.agreement`
measures what is left, and the export refuses white-box numbers when it is too much.
"""

from __future__ import annotations

from typing import Callable

import torch

#: what a constant DequantizeLinear folded at load came from: the integers minus their zero point
#: (float64), the float32 scale and the axis it is per (None for per tensor)
IntegerConstant = tuple[torch.Tensor, torch.Tensor, "int | None"]


def integer_constant(attrs: dict, q: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor | None) -> IntegerConstant | None:
    """The integer view of a constant ``DequantizeLinear(q, scale, zero_point)``, or None where it is
    not an int8/uint8/int32 tensor (nothing to emulate then)."""
    if q.dtype not in (torch.int8, torch.uint8, torch.int32) or scale.dtype != torch.float32:
        return None
    axis = attrs.get("axis", 1) % max(q.dim(), 1)
    shape = [1] * q.dim()
    if q.dim():
        shape[axis] = -1
    zero = zero_point.double().reshape(shape if zero_point.numel() > 1 else ()) if zero_point is not None else 0.0
    values = q.double() - zero
    if scale.numel() == 1:
        return values, scale.reshape(()), None
    return values, scale, axis


class _ValueOf(torch.autograd.Function):
    """``exact``'s value with ``surrogate``'s gradient: the runtime's numbers, the float chain's
    straight-through derivative."""

    @staticmethod
    def forward(ctx, surrogate, exact):
        return exact

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _multiplier(x_scale: torch.Tensor, w_scale: torch.Tensor, y_scale: torch.Tensor) -> torch.Tensor:
    """onnxruntime's requantisation multiplier, rounded to float32 after each operation as it is."""
    return (x_scale.float() * w_scale.float()) / y_scale.float()


def rewrite(nodes: list, consts: dict, integers: dict[str, IntegerConstant]) -> list:
    """``nodes`` with each quantised Conv/Gemm and the fake-quantise of its output merged into one
    ``IntegerConv``/``IntegerGemm`` node (see the module docstring), and ReduceMean marked to sum in
    the runtime's order (:func:`reduce_mean`), where the chain matches exactly:
    input and output fake-quantised per tensor, weight and bias from integer constants, weight scales
    per tensor or per output channel, the float output used by the quantiser alone. New constants
    (the integers, multipliers) are added to ``consts``."""
    users: dict[str, int] = {}
    for _, _, inputs, _ in nodes:
        for name in inputs:
            users[name] = users.get(name, 0) + 1
    quantiser = {outs[0]: (attrs, ins) for op, attrs, ins, outs in nodes
                 if op == "FakeQuantize" and "qrange" in attrs}
    consumer = {}
    for index, (op, attrs, ins, outs) in enumerate(nodes):
        if op == "FakeQuantize" and "qrange" in attrs:
            consumer[ins[0]] = index
    out, dropped = list(nodes), set()
    for index, (op, attrs, inputs, outputs) in enumerate(nodes):
        if op not in ("Conv", "Gemm") or len(inputs) < 2 or inputs[0] not in quantiser:
            continue
        if op == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                             or attrs.get("beta", 1.0) != 1.0):
            continue
        y_index = consumer.get(outputs[0]) if users.get(outputs[0]) == 1 else None
        if (y_index is None and op != "Gemm") or inputs[1] not in integers:
            continue  # a Conv without its output quantiser is no QLinearConv for the runtime either
        bias = inputs[2] if len(inputs) > 2 and inputs[2] else None
        if bias is not None and bias not in integers:
            continue
        w_int, w_scale, w_axis = integers[inputs[1]]
        channels = w_int.shape[0 if op == "Conv" or attrs.get("transB", 0) else 1]
        if w_axis is not None and (w_scale.numel() != channels
                                   or w_axis != (0 if op == "Conv" or attrs.get("transB", 0) else 1)):
            continue
        x_inputs = quantiser[inputs[0]][1]
        name = outputs[0]
        w_int = _narrowest_exact(w_int, quantiser[inputs[0]][0]["qrange"], float(consts[x_inputs[2]]))
        if y_index is None:  # a QGemm with float output: float32(acc) * float32(s_x * s_w)
            consts[f"{name}::w_int"], consts[f"{name}::b_int"] = w_int, _bias(integers, bias, channels)
            consts[f"{name}::multiplier"] = (consts[x_inputs[1]].float() * w_scale.float()).reshape(
                (-1,) if w_axis is not None else ())
            out[index] = ("IntegerGemm", attrs | {"requantize": None},
                          _padded(inputs) + [f"{name}::w_int", f"{name}::b_int", f"{name}::multiplier",
                                             x_inputs[1], "", ""], outputs)
            continue
        y_attrs, y_inputs, y_outputs = nodes[y_index][1], nodes[y_index][2], nodes[y_index][3]
        x_scale, y_scale = consts[x_inputs[1]], consts[y_inputs[1]]
        shape = (-1,) + (1,) * (w_int.dim() - 2) if op == "Conv" else (-1,)
        consts[f"{name}::w_int"] = w_int
        consts[f"{name}::b_int"] = _bias(integers, bias, channels).reshape(shape)
        multiplier = _multiplier(x_scale, w_scale, y_scale)
        consts[f"{name}::multiplier"] = multiplier.reshape(shape if w_axis is not None else ())
        zp_y = float(consts[y_inputs[2]])
        qmin, qmax = y_attrs["qrange"]
        merged = attrs | {"requantize": (qmin - zp_y, qmax - zp_y), "surrogate_quantiser": y_attrs}
        out[index] = ("Integer" + op, merged,
                      _padded(inputs) + [f"{name}::w_int", f"{name}::b_int", f"{name}::multiplier",
                                         x_inputs[1], y_inputs[1], y_inputs[2]], y_outputs)
        dropped.add(y_index)
    out = [(op, attrs | {"kernels": "onnxruntime"}, ins, outs) if op == "ReduceMean" else (op, attrs, ins, outs)
           for op, attrs, ins, outs in out]
    return [node for k, node in enumerate(out) if k not in dropped]


def _narrowest_exact(w_int: torch.Tensor, x_range: tuple[float, float], x_zero_point: float) -> torch.Tensor:
    """The integer weights as float32 where every partial sum of one output is below 2**24 whatever
    the input (then a float32 convolution of integers is exact in any summation order, and runs at
    float32 speed), else float64 (exact below 2**53, about 2.5x slower on a CPU)."""
    largest_input = max(abs(x_range[0] - x_zero_point), abs(x_range[1] - x_zero_point))
    per_output = w_int.abs().reshape(w_int.shape[0], -1).sum(1) if w_int.dim() > 1 else w_int.abs()
    if w_int.dim() == 2:  # a Gemm's (N, K) or (K, N) weight: bound both ways
        per_output = torch.maximum(w_int.abs().sum(1).max(), w_int.abs().sum(0).max())
    return w_int.float() if float(per_output.max()) * largest_input < 2 ** 24 else w_int


def _bias(integers: dict, bias: str | None, channels: int) -> torch.Tensor:
    return integers[bias][0] if bias is not None else torch.zeros(channels, dtype=torch.float64)


def _padded(inputs: list) -> list:
    """The node's (x, w, b) input names, b as "" (an omitted input) when the node has none."""
    return inputs[:3] + [""] * (3 - len(inputs[:3]))


def integer_step(op: str, attrs: dict, float_step: Callable, surrogate_quantiser: Callable | None) -> Callable:
    """The step of an ``IntegerConv``/``IntegerGemm`` node: ``float_step(x, w, b)`` is the float
    Conv/Gemm (the gradient's path and the shape of its arguments), ``surrogate_quantiser(y, scale)``
    the output's fake-quantiser (None for a Gemm with float output)."""
    requantize = attrs["requantize"]
    transposed = op == "IntegerGemm" and attrs.get("transB", 0)

    def integer_product(x_int: torch.Tensor, w_int: torch.Tensor, b_int: None) -> torch.Tensor:
        if op == "IntegerConv":
            return float_step(x_int, w_int, b_int)
        return x_int @ (w_int.t() if transposed else w_int)

    def step(x, w, b, w_int, b_int, multiplier, x_scale, y_scale, zp_y):
        with torch.no_grad():
            x_int = (x.detach() / x_scale).round_().to(w_int.dtype)
            accumulator = integer_product(x_int, w_int, None).double() + b_int
            exact = accumulator.float() * multiplier
            if requantize is not None:
                exact = exact.round_().clamp_(*requantize).mul_(y_scale)
            exact = exact.to(x.dtype)
        if not (x.requires_grad and torch.is_grad_enabled()):
            return exact
        surrogate = float_step(x, w, b)
        return _ValueOf.apply(surrogate if requantize is None else surrogate_quantiser(surrogate, y_scale), exact)
    return step


def gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The float Gemm (alpha = beta = 1, A not transposed) the surrogate gradient follows."""
    out = x @ (w.t() if transposed else w)
    return out if b is None else out + b



def _eigen_sum(v: torch.Tensor) -> torch.Tensor:
    """The sum over the last axis in the order Eigen's vectorised ``redux`` adds a 16-byte-aligned
    float row of length ``N % 4 == 0`` with 4-lane packets (onnxruntime's ``ReduceSum``/``ReduceMean``
    fast path, ``ReduceAggregatorSum::FastReduceKR``): two packet accumulators over pairs of packets,
    one more packet if ``N / 4`` is odd, then lanes ``(0 + 2) + (1 + 3)``."""
    blocks = v.reshape(*v.shape[:-1], v.shape[-1] // 4, 4)
    count = blocks.shape[-2]
    packet = blocks[..., 0, :]
    if count > 1:
        other = blocks[..., 1, :]
        for i in range(2, count - count % 2, 2):
            packet = packet + blocks[..., i, :]
            other = other + blocks[..., i + 1, :]
        packet = packet + other
        if count % 2:
            packet = packet + blocks[..., count - 1, :]
    return (packet[..., 0] + packet[..., 2]) + (packet[..., 1] + packet[..., 3])


def reduce_mean(attrs: dict, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    """ONNX ReduceMean with onnxruntime's float32 rounding where its fast path applies (trailing axes,
    their size a multiple of 4): Eigen's packet sum, then ``/= N`` (``ReduceAggregatorMean``).
    Why it matters: the mean of N dequantised values ``k_i * s`` quantised again with the same scale
    is ``sum(k_i) / N`` steps, exactly on a .5 boundary whenever ``sum(k_i) = N/2 mod N`` (one value
    in N), so the last bit of the float sum decides which way the quantiser after it rounds. Torch's
    sum order gave other last bits than the runtime's on 37% of a MobileNetV2's pooled features (4x4
    maps) and other quantised features on 2% of them. Elsewhere (other axes or sizes, float64) the
    plain mean."""
    dims = attrs.get("axes") if axes is None else [int(v) for v in axes.tolist()]
    keep = bool(attrs.get("keepdims", 1))
    if not dims:
        return x if attrs.get("noop_with_empty_axes", 0) else x.mean(keepdim=keep)
    dims = sorted(d % x.dim() for d in dims)
    plain = x.mean(dim=dims, keepdim=keep)
    size = 1
    for d in dims:
        size *= x.shape[d]
    if x.dtype != torch.float32 or dims != list(range(x.dim() - len(dims), x.dim())) or size % 4:
        return plain
    with torch.no_grad():
        exact = _eigen_sum(x.detach().reshape(*x.shape[:x.dim() - len(dims)], size)) / size
        exact = exact.reshape(plain.shape)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return exact
    return _ValueOf.apply(plain, exact)

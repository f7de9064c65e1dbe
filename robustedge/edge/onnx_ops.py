"""The ONNX operators the twin (:mod:`robustedge.edge.twin`) computes, as rules ``(node attributes,
input tensors) -> output tensors``: QuantizeLinear/DequantizeLinear exactly as the ONNX specification
defines them (straight-through gradients), everything else in float on the dequantised values (the
QDQ format's reference semantics). Kept apart from the twin's loader and compiler so that each file
has one job; an op missing here is refused by the twin, never approximated."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from robustedge.errors import RobustEdgeError

_QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
           np.dtype(np.uint16): (0, 65535), np.dtype(np.int16): (-32768, 32767)}


class _QuantizeSTE(torch.autograd.Function):
    """ONNX QuantizeLinear on float values (the result holds integers), optionally followed by its
    DequantizeLinear (``dequantize``: the fake-quantised activation, one node instead of two).
    Straight-through gradient inside the representable range, zero where the output saturates."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: float, qmax: float, dequantize: bool):
        q = x / scale
        ctx.dequantize = dequantize
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((q >= qmin - 0.5 - zero_point) & (q <= qmax + 0.5 - zero_point), scale)
        q.round_().add_(zero_point).clamp_(qmin, qmax)  # a fresh tensor: in place is safe here
        return q.sub_(zero_point).mul_(scale) if dequantize else q

    @staticmethod
    def backward(ctx, grad):
        inside, scale = ctx.saved_tensors
        return (grad * inside if ctx.dequantize else grad * inside / scale), None, None, None, None, None



def _per_axis(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return param.reshape(shape)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# --------------------------------------------------------------------------------------------
# Operators: (node attributes, input tensors) -> output tensors
# --------------------------------------------------------------------------------------------

def _qrange(zp: torch.Tensor | None) -> tuple[float, float]:
    dtype = zp.dtype if zp is not None else torch.uint8  # ONNX: no zero point means uint8
    qmin, qmax = _QRANGE[np.dtype(str(dtype).replace("torch.", ""))]
    return float(qmin), float(qmax)


def _quantize(a, x, scale, zp=None, dequantize: bool = False):
    if "qrange" in a:  # prepared at load: float zero point and scale, range from the zero point's type
        qmin, qmax = a["qrange"]
        return _QuantizeSTE.apply(x, scale, zp, qmin, qmax, dequantize)
    qmin, qmax = _qrange(zp)
    axis = a.get("axis", 1)
    zp_f = _per_axis((zp if zp is not None else torch.zeros(())).to(x.dtype), x, axis)
    return _QuantizeSTE.apply(x, _per_axis(scale.to(x.dtype), x, axis), zp_f, qmin, qmax, dequantize)


def _dequantize(a, x, scale, zp=None):
    axis = a.get("axis", 1)
    x = x.to(scale.dtype) if not x.is_floating_point() else x
    if zp is not None:
        x = x - _per_axis(zp.to(x.dtype), x, axis)
    return x * _per_axis(scale.to(x.dtype), x, axis)


def _conv(a, x, w, b=None):
    pads = list(a.get("pads", [0] * (2 * (w.dim() - 2))))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise RobustEdgeError("the twin does not support Conv auto_pad; export with explicit pads")
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        pad = []
        for begin, end in reversed(list(zip(pads[:half], pads[half:]))):
            pad += [begin, end]
        x, pads = F.pad(x, pad), [0] * len(pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    return conv(x, w, b, stride=list(a.get("strides", [1])), padding=pads[:half],
                dilation=list(a.get("dilations", [1])), groups=a.get("group", 1))


def _gemm(a, x, w, c=None):
    x = x.transpose(0, 1) if a.get("transA", 0) else x
    w = w.transpose(0, 1) if a.get("transB", 0) else w
    out = a.get("alpha", 1.0) * (x @ w)
    return out if c is None else out + a.get("beta", 1.0) * c


def _reduce_mean(a, x, axes=None):
    dims = a.get("axes") if axes is None else [int(v) for v in axes.tolist()]
    if not dims:
        return x if a.get("noop_with_empty_axes", 0) else x.mean(keepdim=bool(a.get("keepdims", 1)))
    return x.mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))


def _reshape(a, x, shape):
    target = [int(v) for v in shape.tolist()]
    if not a.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _batch_norm(a, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _pool(kind: str) -> Callable:
    def pool(a, x):
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            x, pads = F.pad(x, [pads[1], pads[3], pads[0], pads[2]]), [0, 0, 0, 0]
        kernel, stride = a["kernel_shape"], a.get("strides", [1, 1])
        if kind == "max":
            return F.max_pool2d(x, kernel, stride, pads[:2], dilation=a.get("dilations", [1, 1]),
                                ceil_mode=bool(a.get("ceil_mode", 0)))
        return F.avg_pool2d(x, kernel, stride, pads[:2], ceil_mode=bool(a.get("ceil_mode", 0)),
                            count_include_pad=bool(a.get("count_include_pad", 0)))
    return pool


def _axes(a, axes):
    return a.get("axes") if axes is None else [int(v) for v in axes.tolist()]


def _unsqueeze(a, x, axes=None):
    for axis in sorted(d % (x.dim() + len(_axes(a, axes))) for d in _axes(a, axes)):
        x = x.unsqueeze(axis)
    return x


OPS: dict[str, Callable] = {
    "QuantizeLinear": _quantize,
    "FakeQuantize": lambda a, x, scale, zp=None: _quantize(a, x, scale, zp, dequantize=True),
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda a, x, y: x @ y,
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Relu": lambda a, x: F.relu(x),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda a, x: F.hardswish(x),
    "Clip": lambda a, x, lo=None, hi=None: torch.clamp(x, None if lo is None else float(lo),
                                                         None if hi is None else float(hi)),
    "ReduceMean": _reduce_mean,
    "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "Reshape": _reshape,
    "Flatten": lambda a, x: x.reshape(int(np.prod(x.shape[:a.get("axis", 1)])), -1),
    "BatchNormalization": _batch_norm,
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Identity": lambda a, x: x,
    "Transpose": lambda a, x: x.permute(*a["perm"]) if "perm" in a else x.permute(*reversed(range(x.dim()))),
    "Squeeze": lambda a, x, axes=None: x.squeeze(tuple(_axes(a, axes))) if _axes(a, axes) else x.squeeze(),
    "Unsqueeze": _unsqueeze,
    "Shape": lambda a, x: torch.tensor(x.shape, dtype=torch.int64),
    "Gather": lambda a, x, i: torch.index_select(x, a.get("axis", 0), i.reshape(-1).long()).reshape(
        list(x.shape[:a.get("axis", 0)]) + list(i.shape) + list(x.shape[a.get("axis", 0) + 1:])),
    "Cast": lambda a, x: x,  # the twin computes in float; integer casts only occur in shape arithmetic here
}

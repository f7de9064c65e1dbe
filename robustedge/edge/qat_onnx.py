"""A QAT student (robustedge/qat.py) as a QDQ ONNX file: the export side of quantization-aware training.

The converted PT2E graph exports to ONNX with float biases and with ReLUs in front of unsigned
quantisers; the two passes here give the file ONNX Runtime's own INT8 form (int32 biases, no redundant
ReLU), so the QAT file runs the same kernels as the post-training one.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from robustedge.edge.convert import onnx_proto, save_checked


def to_qdq_onnx(converted: nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """A converted student (:func:`convert`) as a QDQ ONNX file."""
    proto = onnx_proto(converted, input_shape, "this QAT student")
    quantize_biases(proto)
    drop_relus_before_clamping_quantize(proto)
    return save_checked(proto, path)


def quantize_biases(model) -> int:
    """Store each Conv/Gemm float bias as int32 with scale input_scale x weight_scale behind a
    DequantizeLinear, the QDQ convention integer runtimes execute (and what onnxruntime's own quantizer
    writes). convert_pt2e leaves the folded biases in float; ONNX Runtime then fuses the convolutions
    differently, and its output moved by up to 0.75 logits against the file's own reference semantics
    (0.10 with int32 biases: docs/design/qat.md). Returns how many biases it quantised."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def scale_of(name: str):
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in initializers:
            return None
        return numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)

    done = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        x_scale, w_scale = scale_of(node.input[0]), scale_of(node.input[1])
        if x_scale is None or w_scale is None or x_scale.size != 1:
            continue
        bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
        scale = (x_scale.reshape(()) * w_scale).astype(np.float32).reshape(-1)
        if scale.size not in (1, bias.size):
            continue
        scale = np.broadcast_to(scale, bias.shape).copy()
        quantized = np.clip(np.round(bias / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        base = node.input[2]
        names = [f"{base}_int32", f"{base}_scale", f"{base}_zero_point", f"{base}_dequantized"]
        graph.initializer.extend([numpy_helper.from_array(quantized, names[0]), numpy_helper.from_array(scale, names[1]),
                                  numpy_helper.from_array(np.zeros(bias.shape, np.int32), names[2])])
        graph.node.insert(0, helper.make_node("DequantizeLinear", names[:3], [names[3]], axis=0))
        node.input[2] = names[3]
        done += 1
    return done


def drop_relus_before_clamping_quantize(model) -> int:
    """Remove each Relu whose only consumers are QuantizeLinear nodes whose zero point is their type's
    minimum (uint8 with zero point 0, as x86 ReLU outputs get; int8 with -128, XNNPACK's).

    Exact (same logits, checked): such a QuantizeLinear already maps every negative input to the zero
    point, i.e. to 0, as the Relu would. convert_pt2e keeps the Relu between the convolution and its output quantiser, where it
    stands between ONNX Runtime and its DQ-Conv-Q fusion; onnxruntime's own quantiser writes these
    groups without it. (The larger gap between QAT and PTQ files on ONNX Runtime has another cause:
    docs/design/qat.md, section 10.) Returns how many it removed."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def clamps_at_zero(node) -> bool:  # the zero point is the type's minimum: negatives saturate to 0
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in initializers:
            return False
        zero = initializers[node.input[2]]
        lowest = {TensorProto.UINT8: 0, TensorProto.INT8: -128}.get(zero.data_type)
        return lowest is not None and bool((numpy_helper.to_array(zero) == lowest).all())

    removed = []
    for node in graph.node:
        users = consumers.get(node.output[0], []) if node.op_type == "Relu" else []
        if users and node.output[0] not in outputs and all(clamps_at_zero(u) for u in users):
            for user in users:
                user.input[0] = node.input[0]
            removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)

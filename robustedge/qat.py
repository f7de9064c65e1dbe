"""Quantization-aware training: the student trained as the INT8 function it will be deployed as.

Robust training makes a model robust as a float function; after quantisation it is a different
function. Here the student is trained under fake quantisation that matches the export's INT8 scheme,
and the training attack runs on the fake-quantised student, so it learns to be robust as the INT8
model (docs/design/qat.md, "Quantization-aware training").

The library is torchao's PT2E flow (``prepare_qat_pt2e`` / ``convert_pt2e`` with the
``X86InductorQuantizer``), chosen by measurement over NVIDIA ModelOpt (docs/design/qat.md gives the
comparison): per-channel symmetric int8 weights and per-tensor asymmetric uint8 activations, which is
exactly the QDQ scheme ONNX Runtime's x86 kernels run (``onnx-int8``'s default), with conv+BN folded
during training as it is at deployment; ``int8-symmetric`` activations (zero points 0) give files
TensorRT accepts; ``int8`` trains under ExecuTorch's XNNPACK quantizer (int8 activations with zero
points), the scheme a phone's ``executorch-int8`` program runs. A converted student exports through ``torch.onnx.export`` to a QDQ ONNX file with
its learned scales: no post-training calibration.

:class:`QATStudent` wraps the prepared graph so the rest of RobustEdge can treat it as any model:
``train()``/``eval()`` switch batch norm the way PT2E requires and turn the observers on only in
training, so attacks, validation and evaluation never move the learned ranges.
"""

from __future__ import annotations

import copy
import re
import warnings

import torch
from torch import nn

from robustedge.errors import Diverged, RobustEdgeError
from robustedge.pt2e_fast import faster_pt2e, torchao_version

ACTIVATIONS = ("uint8", "int8-symmetric", "int8")
MAX_BATCH = 4096
# where the quantisers sit, per scheme: ``onnxruntime`` is torchao's x86 quantizer with every residual add's
# inputs quantised (ONNX Runtime's QDQ shape, see _OnnxRuntimeX86Quantizer); ``x86-inductor`` the x86
# quantizer as is (Inductor fuses conv+add, so the convolution before each add keeps a float output: what
# every uint8 QAT student saved before this key existed was trained under); ``xnnpack`` ExecuTorch's
PATTERNS = {"uint8": "onnxruntime", "int8-symmetric": "x86-inductor", "int8": "xnnpack"}
LEGACY_PATTERNS = {"uint8": "x86-inductor", "int8-symmetric": "x86-inductor", "int8": "xnnpack"}  # metadata names none


def saved_scheme(qat_meta: object, where: str) -> tuple[str, str]:
    """(activations, patterns) of a saved QAT student's metadata (``meta.extra["qat"]``). A student saved
    before the metadata named its patterns was trained under its scheme's old ones."""
    activations = qat_meta.get("activations", "uint8") if isinstance(qat_meta, dict) else None
    patterns = qat_meta.get("patterns", LEGACY_PATTERNS.get(activations)) if isinstance(qat_meta, dict) else None
    if activations not in PATTERNS or patterns not in (PATTERNS[activations], LEGACY_PATTERNS[activations]):
        raise RobustEdgeError(f"{where}: malformed QAT metadata (activations {activations!r}, patterns {patterns!r})")
    return activations, patterns


def _onnxruntime_x86_quantizer():
    """torchao's ``X86InductorQuantizer`` with the residual adds quantised the way ONNX Runtime runs them.

    The x86 quantizer annotates conv(+bn)+add as one pattern for Inductor, which fuses it: the add's other
    input is quantised, the convolution's output is not. ONNX Runtime has no such fusion; it runs
    DQ-Conv-Q as QLinearConv and DQ-DQ-Add-Q as QLinearAdd, and a convolution without an output quantiser
    in float, with layout transposes around it. On a 32x32 MobileNetV2 that made the QAT file 6x slower
    than onnxruntime's own PTQ file (docs/design/qat.md, section 10). Here every add the x86 quantizer
    annotated gets the missing input quantiser too (the convolution's output), which is where
    onnxruntime's quantizer puts it: the trained function is then the one ONNX Runtime runs in integers."""
    from torch.fx import Node
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (QUANT_ANNOTATION_KEY,
                                                                            X86InductorQuantizer)

    adds = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)

    class OnnxRuntimeX86Quantizer(X86InductorQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            spec = self.global_config.input_activation
            for node in model.graph.nodes:
                annotation = node.meta.get(QUANT_ANNOTATION_KEY)
                if node.target not in adds or annotation is None or not annotation.input_qspec_map:
                    continue
                for arg in node.args[:2]:
                    if isinstance(arg, Node) and arg not in annotation.input_qspec_map:
                        annotation.input_qspec_map[arg] = spec
            return model

    return OnnxRuntimeX86Quantizer()


def _base_config(activations: str, patterns: str):
    """(quantizer, its QAT config): torchao's x86 quantizer for ONNX Runtime and TensorRT, ExecuTorch's
    XNNPACK quantizer for phones (``int8``: int8 activations with zero points, every convolution's and
    add's output quantised, which is what the XNNPACK delegate runs end to end)."""
    if activations == "int8":
        try:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                                 get_symmetric_quantization_config)
        except ImportError:
            raise RobustEdgeError('QAT activations int8 (the XNNPACK scheme) need ExecuTorch: '
                                  'pip install "robustedge[mobile]"') from None
        return XNNPACKQuantizer(), get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = _onnxruntime_x86_quantizer() if patterns == "onnxruntime" else X86InductorQuantizer()
    return quantizer, get_default_x86_inductor_quantization_config(is_qat=True)


def _quantizer(activations: str, patterns: str):
    from dataclasses import replace

    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    if activations not in ACTIVATIONS:
        raise RobustEdgeError(f"QAT activations must be one of {', '.join(ACTIVATIONS)}, got '{activations}'")
    quantizer, config = _base_config(activations, patterns)
    # Every fake quantiser is the unfused FakeQuantize, which takes its scales from the observer's
    # calculate_qparams, as convert_pt2e does. The default fused kernel computes per-channel symmetric
    # weight scales with another divisor (about 0.4% apart), so training simulated weights the converted
    # model does not have, and the two disagreed on 3.5% of digits (docs/design/qat.md).
    weight = replace(config.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12))
    act = replace(config.input_activation, observer_or_fake_quant_ctr=FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, eps=2**-12))
    config = replace(config, weight=weight, input_activation=act, output_activation=act)
    if activations == "int8-symmetric":  # TensorRT's explicit quantisation takes zero points of 0 only
        act = replace(config.input_activation, dtype=torch.int8, quant_min=-128, quant_max=127,
                      qscheme=torch.per_tensor_symmetric)
        config = replace(config, input_activation=act, output_activation=act)
    return quantizer.set_global(config)


def _set_observers(graph: nn.Module, enabled: bool) -> None:
    from torchao.quantization.pt2e.fake_quantize import disable_observer, enable_observer

    graph.apply(enable_observer if enabled else disable_observer)


def _share_tensors(target: nn.Module, source: nn.Module) -> None:
    """Point every parameter and buffer of ``target`` at ``source``'s tensor of the same name, except
    the batch-norm step counters: the exported graph still increments them in eval mode, and an
    evaluation must not change the training state."""
    for kind in ("_parameters", "_buffers"):
        for name, tensor in getattr(source, f"named_{kind[1:]}")():
            parent, _, leaf = name.rpartition(".")
            if leaf != "num_batches_tracked":
                getattr(target.get_submodule(parent), kind)[leaf] = tensor


class QATStudent(nn.Module):
    """A fake-quantised student (a torch.export graph prepared for QAT) behaving like any module.

    ``train(True)`` puts batch norm in training mode and lets the fake quantisers' observers follow
    the activations; ``train(False)`` freezes both, so the attacks of a training step, validation
    and every evaluation see the current INT8 function without changing it.

    Switching an exported graph between train and eval rewrites it (``move_exported_model_to_eval``),
    far too slow to do for every attack of every step; so the eval-mode graph is built once and shares
    every parameter and buffer with the training graph (only the training graph is in the state dict).
    """

    def __init__(self, graph: nn.Module, activations: str, patterns: str | None = None) -> None:
        super().__init__()
        self.graph = graph
        self.activations = activations
        self.patterns = patterns or PATTERNS[activations]  # where its quantisers sit (PATTERNS)
        self.frozen = False  # see freeze()
        self._eval_graph: nn.Module | None = None  # plain attribute: not a submodule, not in the state dict
        self.train(True)

    def _evaluation_graph(self) -> nn.Module:
        if self._eval_graph is None:
            from torchao.quantization.pt2e import move_exported_model_to_eval

            # the pattern rewrite traces with random example inputs: keep the caller's RNG untouched, or
            # a graph built lazily inside an epoch would shift that epoch's attack starts (and resume
            # would no longer be bitwise)
            # and outside inference mode: a graph first needed under torch.inference_mode (an evaluation)
            # would otherwise hold inference tensors that a later normal call cannot update in place
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
                graph = copy.deepcopy(self.graph)
                move_exported_model_to_eval(graph)
            _share_tensors(graph, self.graph)
            object.__setattr__(self, "_eval_graph", graph)
        return self._eval_graph

    def _apply(self, fn, recurse=True):  # .to()/.float() may replace buffers: rebuild the shared view
        object.__setattr__(self, "_eval_graph", None)
        return super()._apply(fn, recurse)

    def freeze(self) -> None:
        """Train from now on against the function the export ships: the observers stay off (the scales are
        final) and batch norm uses its running statistics, no longer updated, as QAT recipes end (PyTorch's
        QAT tutorial freezes the observers, then the batch-norm statistics, for the last epochs). Training
        then runs through the eval-mode graph, whose parameters are the training graph's own."""
        self.frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "QATStudent":
        _set_observers(self.graph, mode and not self.frozen)  # the flags are shared buffers: both graphs follow
        if (not mode or self.frozen) and self._eval_graph is not None:
            # observers may have replaced a buffer (first per-channel observation) since the last switch
            _share_tensors(self._eval_graph, self.graph)
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        graph = self.graph if self.training and not self.frozen else self._evaluation_graph()
        try:
            return graph(x)
        except AssertionError as exc:  # an observer fed NaN: "min nan should be less than max nan"
            if re.search(r"\bnan\b", str(exc)):
                raise Diverged("the fake-quantised student's activations became NaN") from None
            raise

    def match_quantizer_shapes(self, state_dict) -> None:
        """Resize the quantisers' buffers to a saved state's shapes: they take their per-channel shapes
        only when they first see data. In place, so the eval view keeps sharing them."""
        buffers = dict(self.named_buffers())
        for name, value in state_dict.items():
            if name in buffers and buffers[name].shape != value.shape and \
                    name.rsplit(".", 1)[-1] in ("scale", "zero_point", "min_val", "max_val"):
                buffers[name].resize_(value.shape)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, for a state read back from a file. The observers read the
        module versions that ``state_dict()`` attaches as ``_metadata`` (a safetensors file cannot keep
        them) and, finding none, would reset their ``eps`` as for a pre-v2 checkpoint; the versions of
        this very graph are attached instead."""
        from collections import OrderedDict

        self.match_quantizer_shapes(state_dict)
        if getattr(state_dict, "_metadata", None) is None:
            state_dict = OrderedDict(state_dict)
            state_dict._metadata = super().state_dict()._metadata
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def prepare_qat(model: nn.Module, input_shape: tuple[int, int, int], activations: str = "uint8",
                patterns: str | None = None) -> QATStudent:
    """Export ``model`` (a registry Classifier) with a dynamic batch axis and insert fake quantisers
    (``patterns``: where, see PATTERNS; None: the scheme's current ones, a saved student's own otherwise).

    Exporting and annotating cost seconds (about 9 s for the digits MobileNetV2 on this CPU) and are
    the same for every model of one structure, so a process keeps the freshly prepared graph of the
    last few structures and gives a later model of the same structure a copy holding its own
    tensors: a QAT run, its export and its report in one process prepare once (see :class:`_Prepared`)."""
    with torch.random.fork_rng(devices=[]):  # tracing must not move the RNG
        example = torch.rand(2, *input_shape, device=next(model.parameters()).device)
    if activations not in ACTIVATIONS:
        raise RobustEdgeError(f"QAT activations must be one of {', '.join(ACTIVATIONS)}, got '{activations}'")
    patterns = patterns or PATTERNS[activations]
    if patterns not in (PATTERNS[activations], LEGACY_PATTERNS[activations]):
        raise RobustEdgeError(f"QAT activations {activations} are not trained under '{patterns}' patterns")
    scheme = f"{activations}/{patterns}"  # the cache's key
    prepared = _PREPARED.lookup(model, input_shape, scheme)
    if prepared is None:
        prepared = _prepare_graph(copy.deepcopy(model).train(), example, activations, patterns)
        _PREPARED.store(model, input_shape, scheme, prepared)
    student = QATStudent(prepared, activations, patterns)
    _initialise_quantizers(student, example)
    return student


def _prepare_graph(model: nn.Module, example: torch.Tensor, activations: str, patterns: str) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    quantizer = _quantizer(activations, patterns)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), faster_pt2e():
            warnings.simplefilter("ignore")
            graph = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}).module()
            return prepare_qat_pt2e(graph, quantizer)
    except RobustEdgeError:
        raise
    except Exception as exc:  # torch.export / the quantizer's annotation raise many types
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RobustEdgeError(f"cannot prepare this model for quantization-aware training (torchao PT2E): "
                              f"{first[:200]}") from None


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


class _Prepared:
    """Freshly prepared QAT graphs (never trained, never observed) of the last few model structures.

    A structure is the module tree, its ``repr`` (layer settings), every tensor's name, shape and dtype,
    the input shape, the scheme and the device. A graph holds the model's tensors under the same names;
    a model tensor the graph does not hold by name (one the export baked in as a constant, or one the
    forward never uses, such as WideResNet's unused ``sub_block1``) is part of the key by value, which
    is conservative: an unused tensor that differs costs a fresh prepare, never a wrong graph. A copy with the new model's tensors written in is then the graph preparing that model
    would give (tests/test_qat.py checks every state entry and the outputs against a fresh prepare)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.hits = 0
        self.entries: list[tuple[tuple, dict[str, torch.Tensor], nn.Module]] = []

    @staticmethod
    def _key(model: nn.Module, tensors: dict[str, torch.Tensor], input_shape, activations: str) -> tuple:
        return (tuple((name, type(m)) for name, m in model.named_modules()), repr(model),
                tuple((name, tuple(t.shape), t.dtype, str(t.device)) for name, t in tensors.items()),
                tuple(input_shape), activations)

    def lookup(self, model: nn.Module, input_shape, activations: str) -> nn.Module | None:
        tensors = _named_tensors(model)
        key = self._key(model, tensors, input_shape, activations)
        for entry_key, baked, graph in self.entries:
            if entry_key == key and all(torch.equal(tensors[name], value) for name, value in baked.items()):
                copy_ = copy.deepcopy(graph)
                targets = _named_tensors(copy_)
                with torch.no_grad():
                    for name, tensor in tensors.items():
                        if name in targets:
                            targets[name].copy_(tensor)
                self.hits += 1
                return copy_
        return None

    def store(self, model: nn.Module, input_shape, activations: str, graph: nn.Module) -> None:
        targets, tensors = _named_tensors(graph), _named_tensors(model)
        baked = {name: t.detach().clone() for name, t in tensors.items() if name not in targets}
        key = self._key(model, tensors, input_shape, activations)
        kept = [e for e in self.entries if e[0] != key]
        self.entries = (kept + [(key, baked, copy.deepcopy(graph))])[-self.size:]


_PREPARED = _Prepared()


@torch.no_grad()
def _initialise_quantizers(student: QATStudent, example: torch.Tensor) -> None:
    """Give every fake quantiser its shape and a provisional range, then forget the range.

    A quantiser that has never observed data has a per-tensor placeholder scale, and the eval-mode
    graph (the one attacks run on) fails on it for per-channel weights; a run that starts from scratch
    attacks before its first training forward. One observed forward in eval mode (batch norm
    untouched) fixes the shapes; the observers are then reset so that the first real observation
    (calibration, or the first training batch) sets the range outright instead of being averaged with
    this random batch."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    with torch.random.fork_rng(devices=[]):
        student.train(False)
        _set_observers(student.graph, True)
        student(example)
        for module in student.graph.modules():
            if isinstance(module, FakeQuantizeBase):
                module.activation_post_process.reset_min_max_vals()
        student.train(True)


@torch.no_grad()
def calibrate(student: QATStudent, images: torch.Tensor, batch_size: int = 128) -> None:
    """Set the quantisation ranges from calibration images before training, as post-training
    quantisation does (batch norm in eval mode, observers on): QAT then starts from the PTQ model."""
    was_training = student.training
    student.train(False)
    _set_observers(student.graph, True)
    for chunk in images.split(batch_size):
        student(chunk)
    student.train(was_training)


def convert(student: QATStudent) -> nn.Module:
    """The student's INT8 function with its learned scales (``convert_pt2e``: quantize/dequantize ops
    and integer weights), the one source of its ONNX file and its ExecuTorch program. It takes seconds
    (12 s for the digits MobileNetV2 here), so an export converts once."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with torch.random.fork_rng(devices=[]), faster_pt2e():
        return convert_pt2e(copy.deepcopy(student).train(False).graph)


def library_version() -> str:
    version = torchao_version()
    if not version:  # pragma: no cover - a core dependency
        raise RobustEdgeError("quantization-aware training needs torchao (pip install torchao)")
    return f"torchao {version}"

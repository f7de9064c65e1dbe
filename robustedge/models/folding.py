"""Conv + BatchNorm folding: for inference, and for the attacks inside adversarial training.

A model in eval mode computes BN as a per-channel affine map, which can be folded into the
preceding convolution's weights: the same function up to float rounding (about 1e-6 on logits),
with a third fewer operations. On a 2-core CPU that makes the forward+backward passes attacks are
made of about 1.5x faster for MobileNetV2. Pre-activation BNs (applied before a convolution, as in
PreActResNet) cannot be folded and are kept.

Adversarial training attacks the student in eval mode (as the papers' code does) 10 times per
step, with weights that change every step. ``fold_batchnorm(model, linked=True)`` gives a folded
twin that remembers where each of its tensors comes from; ``twin.refresh()`` re-derives them from
the live model in a few microseconds per layer, so the attack runs on the folded graph without
re-tracing. Its parameters never require gradients: the attack computes input gradients only.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from robustedge.models.base import Classifier


class _Body(nn.Module):
    """The part of a classifier after input normalisation (what torch.fx can trace)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features_to_logits(x)


def _strip(name: str) -> str:
    """Name in the source model of a submodule/tensor of the traced body (drops ``model.``)."""
    return name.split(".", 1)[1] if "." in name else ""


class FoldedClassifier(nn.Module):
    """An eval-only classifier whose conv -> BN pairs are single convolutions."""

    def __init__(self, body: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("input_mean", mean.clone(), persistent=False)
        self.register_buffer("input_std", std.clone(), persistent=False)
        # linked twins only: (folded conv, live conv, live BN) and (own tensor, live tensor) pairs
        self._fused: list[tuple[nn.Conv2d, nn.Conv2d, _BatchNorm]] = []
        self._copied: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mean.numel():
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        return self.body(x)

    @torch.no_grad()
    def refresh(self) -> "FoldedClassifier":
        """Re-derive every tensor from the linked source model's current weights and BN statistics."""
        if not self._copied:  # every linked twin copies at least the input normalisation
            raise RuntimeError("refresh() needs a twin made with fold_batchnorm(model, linked=True)")
        for folded, conv, bn in self._fused:
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                bn.weight, bn.bias)
            folded.weight.copy_(weight)
            folded.bias.copy_(bias)
        for target, source in self._copied:
            target.copy_(source)
        return self


def _fold_pairs(traced: fx.GraphModule) -> list[tuple[str, str]]:
    """Fold every Conv2d whose only consumer is a BN in running-statistics mode; return the pairs."""
    modules = dict(traced.named_modules())
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in list(traced.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or calls[node.target] != 1:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and type(modules.get(prev.target)) is nn.Conv2d and calls[prev.target] == 1):
            continue
        parent_name, _, attr = prev.target.rpartition(".")
        setattr(traced.get_submodule(parent_name), attr, fuse_conv_bn_eval(modules[prev.target], bn))
        node.replace_all_uses_with(prev)
        traced.graph.erase_node(node)
        pairs.append((prev.target, node.target))
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return pairs


def fold_batchnorm(model: Classifier, *, linked: bool = False) -> FoldedClassifier:
    """An eval-only copy of ``model`` with every conv -> BN pair folded into one conv.

    ``linked=True`` keeps references to ``model``'s tensors (not the module: no state_dict entry) so that :meth:`FoldedClassifier.refresh` can
    follow its training; the copy keeps the model's device, dtype and memory format.
    """
    source = copy.deepcopy(model).eval()
    traced = fx.symbolic_trace(_Body(source))
    pairs = _fold_pairs(traced)
    for p in traced.parameters():
        p.requires_grad_(False)
    folded = FoldedClassifier(traced, model.input_mean, model.input_std).eval()
    if linked:
        live = dict(model.named_modules())
        fused_names = set()
        for conv_name, bn_name in pairs:
            folded._fused.append((traced.get_submodule(conv_name), live[_strip(conv_name)], live[_strip(bn_name)]))
            fused_names.update({f"{conv_name}.weight", f"{conv_name}.bias"})
        sources = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, tensor in list(traced.named_parameters()) + list(traced.named_buffers()):
            if name not in fused_names:
                folded._copied.append((tensor, sources[_strip(name)]))
        folded._copied += [(folded.input_mean, model.input_mean), (folded.input_std, model.input_std)]
    return folded


def fold_if_possible(model: nn.Module) -> nn.Module:
    """The folded copy of a registry :class:`Classifier`; any other model (a QAT student, a foreign
    module) as it is, in eval mode: folding is a speed-up, never a requirement."""
    return fold_batchnorm(model) if isinstance(model, Classifier) else model.eval()

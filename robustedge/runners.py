"""torch-side runners: a torch model, and any runner seen as a torch module for query attacks.

The exported runtimes' runners (ONNX Runtime, TensorRT) live in the torch-free
:mod:`robustedge.verifier`, which every bundle carries as its own verifier; this module adds what
needs torch: :class:`TorchRunner`, so torch is timed and queried exactly like the runtimes, and
:class:`RunnerModule`, so pyautoattack's Square attack can query a runtime directly (Square needs
outputs only, no gradients), and :class:`QueriedTwin`, an artifact's differentiable twin that hands
query-only attacks to the artifact's runtime.
"""

from __future__ import annotations

import numpy as np
import torch

from robustedge.verifier import check_finite


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s tensors live (its first parameter or buffer; the CPU for a tensor-less module)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class TorchRunner:
    """A torch model behind the runners' interface (float32 numpy in, logits out as host numpy), in
    eval and inference mode. Inputs go to ``device`` (default: where the model's tensors are, so a
    CUDA model is queried on its GPU) and logits come back to host memory."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else model_device(model)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            return self.model(batch).float().cpu().numpy()


class RunnerModule(torch.nn.Module):
    """A runtime seen as a torch module (outputs only, checked finite) for query-based attacks."""

    def __init__(self, runner, what: str = "the model") -> None:
        super().__init__()
        self.runner, self.what = runner, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = check_finite(self.runner(x.detach().cpu().numpy()), self.what)
        return torch.from_numpy(logits).to(x.device)


class QueriedTwin(torch.nn.Module):
    """An exported file's differentiable twin for gradients, its runtime for queries.

    ``forward`` is the twin's (what gradient attacks differentiate); ``query_model`` is the runtime as a
    module, which :func:`robustedge.attacks.autoattack` hands to AutoAttack's Square stage. Why that is
    exact, not an approximation: the number reported for the file is its runtime's accuracy on the
    examples, and Square is a search on outputs alone, so querying the runtime runs Square against the
    very function being measured; the twin only ever stood in for it (equal up to a quantisation step
    where a value lands on a rounding boundary). It is also far cheaper: the twin interprets the graph in
    torch, the runtime runs fused integer kernels, and Square makes up to 5,000 queries per example.
    """

    def __init__(self, twin: torch.nn.Module, runtime: torch.nn.Module) -> None:
        super().__init__()
        self.twin, self.query_model = twin, runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.twin(x)

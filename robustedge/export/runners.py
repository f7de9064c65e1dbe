"""torch-side runners: a torch model, and any runner seen as a torch module for query attacks.

The exported runtimes' runners (ONNX Runtime, TensorRT) live in the torch-free
:mod:`robustedge.verify_core`, which every bundle carries as its own verifier; this module adds what
needs torch: :class:`TorchRunner`, so torch is timed and queried exactly like the runtimes, and
:class:`RunnerModule`, so pyautoattack's Square attack can query a runtime directly (Square needs
outputs only, no gradients).
"""

from __future__ import annotations

import numpy as np
import torch

from robustedge.verify_core import check_finite


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

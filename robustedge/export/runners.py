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


class TorchRunner:
    """A torch model behind the runners' interface (float32 numpy in, logits out), in eval and
    inference mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()


class RunnerModule(torch.nn.Module):
    """A runtime seen as a torch module (outputs only, checked finite) for query-based attacks."""

    def __init__(self, runner, what: str = "the model") -> None:
        super().__init__()
        self.runner, self.what = runner, what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = check_finite(self.runner(x.detach().cpu().numpy()), self.what)
        return torch.from_numpy(logits).to(x.device)

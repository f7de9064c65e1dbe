"""Run an exported artifact through its own runtime: numpy in, numpy logits out.

Verification must measure the artifact a device will run, not the torch model it came from, so
each format gets a runner over its real runtime (onnxruntime sessions, TensorRT engines).
:class:`RunnerModule` wraps a runner as a ``torch.nn.Module`` so pyautoattack's Square attack can
query it directly (Square needs outputs only, no gradients).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from robustedge.errors import RobustEdgeError


class TorchRunner:
    """A torch model behind the runners' interface (float32 numpy in, logits out), in eval and
    inference mode: so torch is timed and queried exactly like the exported runtimes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()


class OrtRunner:
    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RobustEdgeError(f"onnxruntime cannot load {path.name}: {str(exc).splitlines()[0]}") from None
        self.input = self.session.get_inputs()[0]
        self.input_name = self.input.name

    def check_shape(self, shape: tuple[int, ...]) -> None:
        expected = self.input.shape[1:]
        if any(isinstance(e, int) and e != s for e, s in zip(expected, shape[1:])) or len(expected) != len(shape) - 1:
            raise RobustEdgeError(f"input shape {tuple(shape[1:])} does not fit the model's {tuple(expected)}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(np.float32)


class TrtRunner:  # pragma: no cover - needs a GPU and tensorrt; exercised by tests marked gpu
    def __init__(self, path: Path) -> None:
        import tensorrt as trt

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RobustEdgeError(f"TensorRT cannot load {path.name} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = self.engine.get_tensor_name(0), self.engine.get_tensor_name(1)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        expected = tuple(self.engine.get_tensor_shape(self.input_name))[1:]
        if expected != tuple(shape[1:]):
            raise RobustEdgeError(f"input shape {tuple(shape[1:])} does not fit the engine's {expected}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(inp.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda")
        self.context.set_tensor_address(self.input_name, inp.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()


def open_runner(path: Path, fmt: str):
    if fmt.startswith("onnx"):
        return OrtRunner(path)
    if fmt.startswith("trt"):
        return TrtRunner(path)
    raise RobustEdgeError(f"no runtime for format '{fmt}'")


def predict(runner, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([runner(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def median_latency_ms(runner, sample: np.ndarray, batch: int, repeats: int = 30, warmup: int = 5) -> float:
    x = np.repeat(sample[:1], batch, axis=0) if len(sample) < batch else sample[:batch]
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


class RunnerModule(torch.nn.Module):
    """A runtime seen as a torch module (outputs only) for query-based attacks."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner(x.detach().cpu().numpy())).to(x.device)

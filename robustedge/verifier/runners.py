"""The runtimes that execute an exported file: ONNX Runtime, TensorRT, ExecuTorch; batches and latency.

Each runtime is imported when a file of its format is opened, never before: a device verifying ONNX
files needs numpy and onnxruntime only.
"""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from robustedge.verifier.base import RobustEdgeError, first_line
from robustedge.verifier.formats import FORMATS


def check_finite(logits: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=-1).sum()) if logits.ndim > 1 else 1
        raise RobustEdgeError(f"{what} gave non-finite logits (NaN/Inf) for {bad} of {len(logits)} inputs; "
                                f"refusing to report accuracy on them")
    return logits


class OrtRunner:
    """An ONNX Runtime session on the CPU: float32 NCHW in, float32 logits out."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RobustEdgeError(f"onnxruntime cannot load {Path(path).name}: "
                                    f"{first_line(exc)}"
                                    ) from None
        self.input = self.session.get_inputs()[0]
        self.input_name = self.input.name
        self.input_shape = tuple(self.input.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(
            np.float32)


class DeviceBuffers:
    """Input and output buffers on the GPU for an engine, grown when a batch needs more and kept between
    calls: Square and AutoAttack's Square stage make thousands of small queries, and a cudaMalloc and
    cudaFree per query cost more than the inference. ``cudart`` is cuda-python's runtime module."""

    def __init__(self, cudart) -> None:
        self.cudart = cudart
        self.pointers: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def _check(self, err, what: str) -> None:
        if int(err) != 0:
            raise RobustEdgeError(f"CUDA {what} failed (error {int(err)})")

    def get(self, which: str, nbytes: int) -> int:
        if nbytes > self.sizes.get(which, 0):
            self.release(which)
            err, pointer = self.cudart.cudaMalloc(nbytes)
            self._check(err, f"allocation of {nbytes} bytes")
            self.pointers[which], self.sizes[which] = pointer, nbytes
        return self.pointers[which]

    def release(self, which: str | None = None) -> None:
        for name in ([which] if which else list(self.pointers)):
            if name in self.pointers:
                self.cudart.cudaFree(self.pointers.pop(name))
                self.sizes.pop(name, None)

    def run(self, x: np.ndarray, runner) -> np.ndarray:
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty(runner.output_shape(x.shape), dtype=np.float32)
        d_in, d_out = self.get("in", x.nbytes), self.get("out", y.nbytes)
        self._check(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)[0],
                    "copy to the device")
        runner.execute(d_in, d_out, 0)
        self._check(cudart.cudaStreamSynchronize(0)[0], "synchronisation")
        self._check(cudart.cudaMemcpy(y.ctypes.data, d_out, y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)[0],
                    "copy from the device")
        return y


def _cuda_copies():  # pragma: no cover - needs a GPU
    """A ``call(x, runner)`` that runs an engine on host arrays through buffers kept on the GPU: through
    cuda-python, or torch where that is what the device has."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            cudart = None
    if cudart is not None:
        return DeviceBuffers(cudart).run
    try:
        import torch
    except ImportError:
        raise RobustEdgeError("TensorRT verification needs cuda-python (pip install cuda-python) or torch") from None
    kept: dict[str, "torch.Tensor"] = {}

    def buffer(which: str, numel: int) -> "torch.Tensor":
        if which not in kept or kept[which].numel() < numel:
            kept[which] = torch.empty(numel, device="cuda")
        return kept[which][:numel]

    def call_torch(x: np.ndarray, run) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        shape = run.output_shape(x.shape)
        inp = buffer("in", x.size).view(x.shape)
        inp.copy_(torch.from_numpy(x))
        out = buffer("out", int(np.prod(shape))).view(shape)
        stream = torch.cuda.current_stream()
        run.execute(inp.data_ptr(), out.data_ptr(), stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()
    return call_torch


class TrtRunner:  # pragma: no cover - needs a GPU and tensorrt; exercised by tests marked gpu
    """A serialized TensorRT engine (built on this GPU) with a dynamic batch axis."""

    def __init__(self, path: Path) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise RobustEdgeError("the 'tensorrt' package is not installed here") from None
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise RobustEdgeError(f"{Path(path).name}: the engine was built for another GPU or TensorRT version; "
                                    f"rebuild it on this device (export/README.md)")
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_shape = tuple(engine.get_tensor_shape(self.input_name))
        self._call = _cuda_copies()

    def output_shape(self, input_shape: tuple) -> tuple:
        self.context.set_input_shape(self.input_name, tuple(input_shape))
        return tuple(self.context.get_tensor_shape(self.output_name))

    def execute(self, d_in: int, d_out: int, stream: int) -> None:
        self.context.set_tensor_address(self.input_name, int(d_in))
        self.context.set_tensor_address(self.output_name, int(d_out))
        self.context.execute_async_v3(stream)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._call(x, self)


class ExecuTorchRunner:
    """An ExecuTorch program through ExecuTorch's Python runtime (the XNNPACK delegate the phone runs).

    Its pybindings take torch tensors, so torch is imported here and only here: a device verifying
    ONNX files never needs it. Programs are exported for batch 1, the phone's case; a batch runs as
    that many calls (so ``latency_b64_ms`` is 64 sequential calls).
    """

    def __init__(self, path: Path) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise ImportError("the 'executorch' package is not installed here (pip install executorch)") from None
        self.torch = torch
        try:
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        except Exception as exc:  # the runtime raises RuntimeError with an error code
            raise RobustEdgeError(f"executorch cannot load {Path(path).name}: "
                                  f"{first_line(exc)}"
                                  ) from None
        sizes = self.method.metadata.input_tensor_meta(0).sizes() if hasattr(self.method, "metadata") else None
        self.input_shape = tuple(sizes) if sizes else (1, None, None, None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        rows = [self.method.execute([x[i:i + 1]])[0] for i in range(len(x))]
        return self.torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros((0, 0), np.float32)


RUNNERS = {"onnxruntime": OrtRunner, "tensorrt": TrtRunner, "executorch": ExecuTorchRunner}


def open_runner(path: Path, fmt: str):
    if fmt not in FORMATS:
        raise RobustEdgeError(f"unknown format '{fmt}'; known formats: {', '.join(FORMATS)}")
    return RUNNERS[FORMATS[fmt].runtime](path)


def check_input_shape(runner, shape: tuple) -> None:
    """The samples' (C, H, W) must fit the artifact's declared input."""
    expected = tuple(runner.input_shape[1:])
    if len(expected) != len(shape) - 1 or any(isinstance(e, int) and e > 0 and e != s
                                               for e, s in zip(expected, shape[1:])):
        raise RobustEdgeError(f"input shape {tuple(shape[1:])} does not fit the model's {expected}")


def predict(runner, x: np.ndarray, batch_size: int = 256, what: str = "the model") -> np.ndarray:
    """Logits for every row of ``x`` in batches, refusing non-finite values."""
    logits = np.concatenate([runner(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return check_finite(logits, what)


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


def platform_facts() -> dict:
    """Where this process measures: the processor's ISA as the OS reports it (``aarch64`` under an arm64
    emulator too), the OS, Python, and the build of every runtime this process has loaded."""
    builds = {}
    for name in RUNNERS:
        if name in sys.modules:
            try:
                builds[name] = metadata.version(name)
            except metadata.PackageNotFoundError:  # a build installed without metadata (a vendor's wheel)
                builds[name] = str(getattr(sys.modules[name], "__version__", "unknown"))
    return {"isa": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "runtimes": builds}

"""Export to ONNX (fp32 / fp16 / INT8 QDQ) and TensorRT, and robustness re-verification on the artifacts."""

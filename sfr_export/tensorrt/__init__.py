"""TensorRT 11's rules as code: the explicit-quantization (Q/DQ) conformance check. Pure ONNX; no TensorRT needed."""

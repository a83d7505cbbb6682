"""INT8 quantization helpers for the calibrate stage: recipes, leakage guard, SmoothQuant, Q/DQ graph rewriting,
per-layer sensitivity. Importing this package pulls no torch or onnxruntime."""

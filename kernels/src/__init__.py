"""GPU kernels (Triton), installed as ``sfr_export.kernels``. Importing this package never imports triton."""

from .last_token import compile_ptx, kernel_available, last_token_l2

__all__ = ["compile_ptx", "kernel_available", "last_token_l2"]

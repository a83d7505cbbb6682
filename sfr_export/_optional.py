"""Lazy imports of heavy optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module name -> (pip extra, note)
_EXTRAS: dict[str, str] = {
    "tensorrt": "gpu",
    "tensorrt_lean": "gpu",
    "triton": "gpu",
    "peft": "train",
    "accelerate": "train",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "httpx": "serve",
    "sklearn": "eval",
    "mteb": "eval",
    "matplotlib": "dev",
    "gguf": "demo",
    "mistral_common": "demo",
    "pyarrow": "corpus",
    "ray": "ray",
}


def require(module: str, *, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'sfr-export[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(f"Python package '{module}' is not installed{what}: {hint}") from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (does not import it if a spec lookup suffices)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

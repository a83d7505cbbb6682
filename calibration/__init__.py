"""Calibration recipes (TOML) and small, license-compatible calibration texts (JSONL); see CREDITS.md."""

from __future__ import annotations

from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parent
DEFAULT_RECIPE = "default.toml"


def calibration_path(name: str) -> Path:
    return CALIBRATION_DIR / name

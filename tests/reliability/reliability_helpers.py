"""Helpers of the reliability tests (imported by them): run the CLI in a subprocess and read its one error line."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error_lines(self) -> list[str]:
        """The ``error: ...`` lines (rich may wrap a long one only when the console is narrow: it is not here)."""
        return [x for x in self.stderr.splitlines() if x.startswith("error:")]

    def one_error(self) -> str:
        """Assert the run failed with exactly one error line and no traceback; return that line."""
        assert self.rc != 0, f"exit 0:\n{self.output}"
        assert "Traceback" not in self.output, self.output
        lines = self.error_lines
        assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{self.output}"
        return lines[0]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    env.pop("SFR_EXPORT_DEBUG", None)
    return {**env, **extra}


def cli_cmd(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "sfr_export.cli", *args]


def run_cli(*args: str | bytes, timeout: float = 300, **env: str) -> CliResult:
    p = subprocess.run(cli_cmd(*args), capture_output=True, env=cli_env(**env), timeout=timeout)
    return CliResult(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))


def umask022() -> None:
    os.umask(0o022)


RO_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def read_only_mounts_work(probe: Path) -> bool:
    """Whether ``unshare -m`` + a read-only bind mount works here (root in a container with CAP_SYS_ADMIN)."""
    import shutil as _sh

    if _sh.which("unshare") is None:
        return False
    p = subprocess.run(["unshare", "-m", "sh", "-c", RO_MOUNT, str(probe), "true"], capture_output=True)
    return p.returncode == 0


def run_cli_read_only(ro_dir: Path, *args: str, timeout: float = 300) -> CliResult:
    """The CLI with ``ro_dir`` bind-mounted read-only in a private mount namespace: writes fail with EROFS even
    for root (``chmod`` would not stop root)."""
    cmd = ["unshare", "-m", "sh", "-c", RO_MOUNT, str(ro_dir), *cli_cmd(*args)]
    p = subprocess.run(cmd, capture_output=True, env=cli_env(), timeout=timeout)
    return CliResult(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))

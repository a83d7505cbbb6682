"""The ``sfr-export`` command line. Thin: parses options into typed configs, calls stages, prints results.

Every ``SfrExportError`` becomes one line on stderr and a non-zero exit code; nothing else is caught.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import SfrExportError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn text-embedding LLMs into faithful ONNX / INT8 / TensorRT artifacts.")
console = Console(stderr=True)
out = Console()

# Modules that add commands with `register(app)`. One line per pipeline area.
COMMAND_MODULES = [
    "sfr_export.commands.core",
    "sfr_export.commands.verify",
    "sfr_export.commands.calibrate",
    "sfr_export.commands.serve",
    "sfr_export.commands.finetune",
    "sfr_export.commands.engine",
    "sfr_export.commands.corpus",
]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only.")) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)],
                        force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)


for _mod in COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def parse_csv(value: str, *, name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserInputError(f"{name} is empty")
    return items


def print_json(data: object) -> None:
    """Machine-readable output on stdout (plain JSON, no rich wrapping)."""
    typer.echo(json.dumps(data, indent=2, default=str))


def main(argv: Optional[list[str]] = None) -> None:
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns typer.Exit codes instead of raising here
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except SfrExportError as exc:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # click's usage errors arrive here in standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()

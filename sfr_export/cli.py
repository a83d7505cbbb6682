"""The ``sfr-export`` command line. Thin: typer parses each option once (choices are Enums), a command calls one
function, and every error a user can cause becomes one line on stderr and a documented exit code
(``sfr_export.errors``). ``--debug`` or ``SFR_EXPORT_DEBUG=1`` shows tracebacks instead."""

from __future__ import annotations

import logging
import os
import sys
from importlib import metadata
from typing import Optional

import typer
from typer._click import exceptions as click_exc  # typer 0.29 vendors click: its own exception classes
from typer.exceptions import Abort
from rich.markup import escape

from .commands import bench, calibrate, core, corpus, engine, finetune, serve, verify
from .commands._ui import console
from .errors import PathError, SfrExportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn text-embedding LLMs into faithful ONNX / INT8 / TensorRT artifacts.")
for _module in (core, verify, calibrate, engine, serve, bench, finetune, corpus):
    for _name, _fn in _module.COMMANDS.items():
        app.command(_name)(_fn)

INTERNAL_ERROR = 70


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sfr-export {metadata.version('sfr-export')}")
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also SFR_EXPORT_DEBUG=1)."),
          version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    from rich.logging import RichHandler

    if debug:
        os.environ["SFR_EXPORT_DEBUG"] = "1"
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)],
                        force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)


def _fail(message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_message(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"{exc.format_message()}{where}"  # type: ignore[attr-defined]


def main(argv: Optional[list[str]] = None) -> None:
    debug = os.environ.get("SFR_EXPORT_DEBUG") == "1" or "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = app(args=argv, standalone_mode=False)  # typer.Exit codes come back as the return value
    except click_exc.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "")  # bare `sfr-export`: the help, exit 0
        rc = 0
    except SfrExportError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except click_exc.ClickException as exc:
        _fail(_usage_message(exc), getattr(exc, "exit_code", 2) or 2)
    except Abort:
        _fail("aborted", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as exc:  # a user-given path that cannot be read or written
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", PathError.exit_code)
    except Exception as exc:  # a bug: still one line, and the way to see more
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug or SFR_EXPORT_DEBUG=1 for the "
              "traceback, and please report it)", INTERNAL_ERROR)
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    main()

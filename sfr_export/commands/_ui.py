"""What every command prints with: the consoles, JSON output, comma lists and the stage spinner."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import UserInputError

console = Console(stderr=True)


def parse_csv(value: str, *, name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserInputError(f"{name} is empty")
    return items


def parse_ints(value: str, *, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in parse_csv(value, name=name))
    except ValueError:
        raise UserInputError(f"{name} takes comma-separated integers, got {value!r}") from None


def print_json(data: object) -> None:
    """Machine-readable output on stdout (plain JSON, no rich wrapping)."""
    typer.echo(json.dumps(data, indent=2, default=str))


def note(text: str, style: str = "yellow") -> None:
    console.print(f"[{style}]{escape(text)}[/]", highlight=False, soft_wrap=True)


def progress_ctx() -> Any:
    """A spinner per stage on a terminal; it disappears when its block ends."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(finished_text="[green]✓[/]"),
                    TextColumn("[bold]{task.fields[stage]}[/] {task.description}"), TimeElapsedColumn(),
                    console=console, transient=True)


class StageSpinners:
    """``on_progress(stage, msg)`` for a multi-stage run: one spinner per stage; when the next stage starts, the
    previous ones stop (a tick, their clock frozen) instead of spinning on until the whole run ends."""

    def __init__(self, prog: Any):
        self.prog = prog
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, msg: str) -> None:
        if stage not in self.tasks:
            self.finish_all()
            self.tasks[stage] = self.prog.add_task(escape(str(msg)), stage=stage, total=None)
        self.prog.update(self.tasks[stage], description=escape(str(msg)))

    def finish_all(self) -> None:
        for task in self.tasks.values():
            if not self.prog.tasks[task].finished:
                self.prog.update(task, total=1, completed=1, description="done")


def run_with_spinner(stage: str, fn: Any) -> Any:
    """Call ``fn(on_progress)`` under one spinner named ``stage``."""
    with progress_ctx() as prog:
        task = prog.add_task("starting", stage=stage, total=None)
        return fn(lambda msg: prog.update(task, description=escape(str(msg))))

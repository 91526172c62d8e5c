"""What every command group shares: the two consoles, option types, the eval options built from ``EvalConfig``,
and the one progress display.

Nothing here imports torch: ``patchbench --help`` and ``patchbench zoo list`` stay instant.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import ensure_dir
from ssl_patchbench.pipeline.config import EvalConfig, option_fields

stderr = Console(stderr=True)
stdout = Console(width=None if sys.stdout.isatty() else 200)  # piped tables are not cut at 80 columns


def split_csv(text: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")`` (blank items dropped)."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


class Csv(click.ParamType):
    """A comma-separated option as a tuple of its items."""

    name = "csv"

    def convert(self, value: Any, param, ctx) -> tuple[str, ...]:
        return value if isinstance(value, tuple) else split_csv(str(value))


class PositiveInts(click.ParamType):
    """``20,200`` -> ``(20, 200)``; every item a positive integer."""

    name = "ints"

    def convert(self, value: Any, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(v) for v in split_csv(str(value)))
        except ValueError:
            self.fail(f"takes comma-separated integers, got {value!r}", param, ctx)
        if not numbers or min(numbers) <= 0:
            self.fail(f"takes positive integers, got {value!r}", param, ctx)
        return numbers


class FloatPair(click.ParamType):
    """``0.2`` -> ``(0.2, 0.2)``; ``0.08,1`` (or ``0.08:1``) -> ``(0.08, 1.0)``; finite numbers only."""

    name = "number[,number]"

    def convert(self, value: Any, param, ctx) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        try:
            parts = [float(v) for v in str(value).replace(":", ",").split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or not all(math.isfinite(p) for p in parts):
            self.fail(f"takes a number or a pair like 0.08,1.0, got {value!r}", param, ctx)
        return (parts[0], parts[-1])


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (click's own range lets nan through)."""

    def convert(self, value: Any, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = click.IntRange(min=1)  # counts, sizes, strides, batch sizes
SEED = click.IntRange(min=0, max=2**64 - 1)
POSITIVE_FLOAT = FiniteFloat(min=0.0, min_open=True)
NON_NEGATIVE_FLOAT = FiniteFloat(min=0.0)


def out_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """click callback of an output folder option: created while the options are parsed, so a path below a file
    or on a read-only mount fails in one line before any work starts."""
    return None if value is None else ensure_dir(Path(value).expanduser())


def out_file(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """click callback of an output file option: its folder is created (or refused) before any work starts."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    ensure_dir(path.parent)
    return path


def _param_type(meta: dict) -> click.ParamType | type | None:
    kind = meta["kind"]
    if kind == "int":
        return click.IntRange(min=meta.get("min"), max=meta.get("max"))
    if kind == "float":
        return FiniteFloat(min=meta.get("min"), max=meta.get("max"), min_open=meta.get("min_open", False))
    if kind == "choice":
        return click.Choice(meta["choices"])
    if kind == "path":
        return click.Path(path_type=Path)
    return {"csv": Csv(), "ints": PositiveInts(), "pair": FloatPair(), "text": None, "flag": None}[kind]


def _default(f: dataclasses.Field) -> dict[str, Any]:
    """click's ``default``/``show_default`` for a field: lists are shown (and passed) as the text a user types."""
    if f.default is dataclasses.MISSING:
        return {"required": True}
    if f.metadata["kind"] in ("csv", "ints"):
        return {"default": ",".join(map(str, f.default)), "show_default": True}
    return {"default": f.default, "show_default": f.default is not None and f.metadata["kind"] != "pair"}


def config_option(f: dataclasses.Field) -> Callable:
    """The click option of one ``EvalConfig`` field, named so that its value lands on that field."""
    meta = f.metadata
    flag = meta["option"] or "--" + f.name.replace("_", "-")
    if meta["kind"] == "flag":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True, help=meta["help"])
    return click.option(flag, f.name, type=_param_type(meta), help=meta["help"], **_default(f))


def eval_options(func: Callable) -> Callable:
    """Every ``EvalConfig`` field as an option, plus ``--nproc`` and ``--json`` (how to run, how to print)."""
    options = [config_option(f) for f in option_fields()]
    options.append(
        click.option(
            "--nproc",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Processes (one per GPU) launched through torchrun; see docs/distributed.md.",
        )
    )
    options.append(click.option("--json", "as_json", is_flag=True, help="One JSON object per line per representation."))
    for option in reversed(options):
        func = option(func)
    return func


def build_config(options: dict[str, Any]) -> EvalConfig:
    """The config the options name, field for field (the non-config options must be popped first)."""
    return EvalConfig(**options)


class progress:
    """A rich progress bar per extraction on a terminal, showing images/s and patches/s (on stderr)."""

    def __enter__(self):
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} img"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
            disable=not stderr.is_terminal,
        )
        self.bar.__enter__()
        return self.factory

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def factory(self, label: str, images: int, patches: int):
        task = self.bar.add_task(label, total=images, speed="")
        per_image = patches / max(images, 1)

        def advance(n_images: int, n_patches: int) -> None:
            self.bar.advance(task, n_images)
            rate = self.bar.tasks[task].speed or 0.0
            self.bar.update(task, speed=f"{rate:,.0f} img/s {rate * per_image:,.0f} patch/s")

        return advance


def write_text(text: str, output: str | None) -> None:
    """``text`` on stdout, or into ``output`` (one line on stderr says where)."""
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from exc
    stderr.print(f"wrote {output}")

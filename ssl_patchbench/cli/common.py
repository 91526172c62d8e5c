"""What every command group shares: the two consoles, option types, the eval options built from ``EvalConfig``,
and the one progress display.

Nothing here imports torch: ``patchbench --help`` and ``patchbench zoo list`` stay instant.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

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


class NonNegativeFloats(click.ParamType):
    """``25,25,1`` -> ``(25.0, 25.0, 1.0)``: exactly ``count`` finite numbers >= 0."""

    name = "numbers"

    def __init__(self, count: int) -> None:
        self.count = count

    def convert(self, value: Any, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(v) for v in split_csv(str(value)))
        except ValueError:
            numbers = ()
        if len(numbers) != self.count or not all(math.isfinite(n) and n >= 0 for n in numbers):
            self.fail(f"takes {self.count} comma-separated numbers >= 0, got {value!r}", param, ctx)
        return numbers


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


def setup_logging(level: int) -> None:
    """Log records (warnings such as "k=200 exceeds the 100 train rows") through the stderr console, so that they
    print above a live progress bar instead of being drawn over."""
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)


class ConsoleHandler(logging.Handler):
    """A logging handler that prints on the shared stderr console, as plain text."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stderr.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


@dataclass
class _Task:
    """One extraction's counts, and the rates measured from its start (so the first batch already has one)."""

    label: str
    images: int
    patches: int
    start: float
    done_images: int = 0
    done_patches: int = 0
    finished: bool = False

    def add(self, images: int, patches: int) -> None:
        self.done_images += images
        self.done_patches += patches

    def rates(self, now: float) -> tuple[float, float]:
        seconds = max(now - self.start, 1e-9)
        return self.done_images / seconds, self.done_patches / seconds

    def eta(self, now: float) -> float | None:
        rate = self.rates(now)[0]
        return (self.images - self.done_images) / rate if rate > 0 else None

    def status(self, now: float) -> str:
        image_rate, patch_rate = self.rates(now)
        return f"{image_rate:,.0f} img/s {patch_rate:,.0f} patch/s"

    def finished_line(self, now: float) -> str:
        return f"{self.label}: {self.done_images:,} images in {_duration(now - self.start)} ({self.status(now)})"


class progress:
    """The one progress display of the CLI (a context manager giving a ``ProgressFactory``), on stderr.

    On a terminal a live rich bar per extraction with images/s, patches/s and the time left, measured from the
    start of the extraction and updated per batch; each finished extraction leaves one line. Elsewhere (a pipe,
    a CI or SLURM log) plain lines: one after the first batch, then one every ``interval`` seconds, then one when
    done: what, how far, how fast, how long left.
    """

    def __init__(self, *, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self.live = stderr.is_terminal
        self.tasks: list[_Task] = []

    def __enter__(self) -> Callable[[str, int, int], Callable[[int, int], None]]:
        if self.live:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} img"),
                TextColumn("{task.fields[status]}"),
                TextColumn("{task.fields[eta]} left"),
                console=stderr,
                transient=True,
            )
            self.bar.__enter__()
        return self.factory

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.__exit__(*exc)
        for task in self.tasks:  # a share of the work (one rank of several) still ends with its line
            if exc[0] is None and task.done_images and not task.finished:
                self._finish(task)

    def _finish(self, task: _Task) -> None:
        task.finished = True
        stderr.print(task.finished_line(self.clock()), markup=False, highlight=False, soft_wrap=True)

    def factory(self, label: str, images: int, patches: int) -> Callable[[int, int], None]:
        """The callback of one extraction of ``images`` images (``patches`` patches in all)."""
        task = _Task(label, images, patches, start=self.clock())
        self.tasks.append(task)
        if images == 0:
            stderr.print(f"{label}: reused cached features", markup=False, highlight=False)
            return lambda n_images, n_patches: None
        return self._live(task) if self.live else self._lines(task)

    def _live(self, task: _Task) -> Callable[[int, int], None]:
        bar_task = self.bar.add_task(task.label, total=task.images, status="", eta=_duration(None))

        def advance(n_images: int, n_patches: int) -> None:
            if task.finished:
                return
            task.add(n_images, n_patches)
            now = self.clock()
            self.bar.update(bar_task, completed=task.done_images, status=task.status(now), eta=_duration(task.eta(now)))
            if task.done_images >= task.images:
                self.bar.remove_task(bar_task)
                self._finish(task)

        return advance

    def _lines(self, task: _Task) -> Callable[[int, int], None]:
        last: float | None = None

        def advance(n_images: int, n_patches: int) -> None:
            nonlocal last
            if task.finished:
                return
            task.add(n_images, n_patches)
            now = self.clock()
            if task.done_images >= task.images:
                self._finish(task)
            elif last is None or now - last >= self.interval:
                last = now
                share = 100 * task.done_images / task.images
                stderr.print(
                    f"{task.label}: {task.done_images:,}/{task.images:,} images ({share:.0f}%), {task.status(now)}, "
                    f"{_duration(task.eta(now))} left",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )

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

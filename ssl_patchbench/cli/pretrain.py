"""``patchbench pretrain``: the click command and its progress display; the work is in ``pretrain``.

torch is imported inside the command, so ``patchbench --help`` stays instant.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ssl_patchbench.cli.common import (
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    POSITIVE_FLOAT,
    SEED,
    FloatPair,
    NonNegativeFloats,
    out_dir,
    stderr,
)
from ssl_patchbench.pretrain.config import AUTO_COMPILE_STEPS, COMPILE_MODES, INTERPOLATIONS


def _eta(seconds: float) -> str:
    """``1:02:03`` / ``2:03``: the time left, as rich's remaining-time column shows it."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineReporter:
    """One log line per logged step and per epoch on stderr (pipes, CI, batch jobs)."""

    def on_step(self, p) -> None:
        click.echo(
            f"epoch {p.epoch + 1}/{p.epochs} step {p.step}/{p.steps} loss {p.loss:.4f} lr {p.lr:.4f} "
            f"{p.images_per_s:,.0f} img/s eta {_eta(p.eta_s)}",
            err=True,
        )

    def on_epoch(self, p) -> None:
        click.echo(
            f"epoch {p.epoch + 1}/{p.epochs} done: loss {p.loss:.4f} {p.seconds:.2f} s {p.images_per_s:,.0f} img/s "
            f"eta {_eta(p.eta_s)}",
            err=True,
        )


class RichReporter:
    """A rich progress bar over all steps of the run, with epoch, step, the last loss, images/s and the
    trainer's ETA (terminals)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("pretrain"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=stderr,
        )
        self.task = self.bar.add_task("pretrain", total=None, status="", eta="-")

    def __enter__(self) -> RichReporter:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def on_step(self, p) -> None:
        status = f"epoch {p.epoch + 1}/{p.epochs} step {p.step}/{p.steps} loss {p.loss:.4f} {p.images_per_s:,.0f} img/s"
        completed = p.epoch * p.steps + p.step
        self.bar.update(self.task, total=p.epochs * p.steps, completed=completed, status=status, eta=_eta(p.eta_s))

    def on_epoch(self, p) -> None:
        completed = (p.epoch + 1) * p.steps
        self.bar.update(self.task, total=p.epochs * p.steps, completed=completed, eta=_eta(p.eta_s))
        self.bar.console.print(f"epoch {p.epoch + 1}/{p.epochs}: loss {p.loss:.4f} {p.seconds:.2f} s")


def summary(cfg, result, wall: float) -> dict:
    """The run's JSON line: where the checkpoint is and how fast the epochs of this call went."""
    seconds = result.epoch_seconds
    steady = seconds[1:] if len(seconds) > 1 else seconds  # the first epoch carries cuDNN autotuning
    return {
        "method": cfg.method,
        "arch": cfg.arch,
        "scale": list(cfg.scale),
        "num_patches": cfg.num_patches,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "epochs_done": result.epochs_done,
        "epochs_this_call": len(seconds),
        "first_epoch_s": round(seconds[0], 3) if seconds else None,
        "seconds_per_epoch": round(statistics.median(steady), 3) if steady else None,
        "images_per_s": round(result.images_per_s, 1) if result.images_per_s else None,
        "final_loss": result.final_loss,
        "checkpoint": str(result.checkpoint),
        "wall_s": round(wall, 1),
    }


@click.command("pretrain")
@click.option(
    "--method", type=click.Choice(["vicreg", "tcr"]), default="vicreg", show_default=True, help="The SSL objective."
)
@click.option(
    "--arch",
    default="resnet18_cifar",
    show_default=True,
    help="resnet18_cifar, resnet34_cifar, resnet50, tiny_cifar, or a zoo entry with a projector.",
)
@click.option("--dataset", required=True, help="cifar10, cifar100, stl10, digits, or an ImageFolder name.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="ImageFolder tree or torchvision root.")
@click.option("--train-per-class", type=POSITIVE, help="Keep the first N train images of each class (quick runs).")
@click.option(
    "--scale",
    type=FloatPair(),
    default="0.2",
    show_default=True,
    help="Patch area fraction (0.2) or a range (0.08,1.0).",
)
@click.option(
    "--num-patches",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Views per image (>2: EMP-SSL mean).",
)
@click.option(
    "--epochs", type=POSITIVE, default=100, show_default=True, help="Epochs of the whole run (hours on a CPU)."
)
@click.option("--batch-size", type=click.IntRange(min=2), default=512, show_default=True, help="Images per step.")
@click.option("--lr", type=POSITIVE_FLOAT, default=0.3, show_default=True, help="LARS learning rate per 256 images.")
@click.option("--weight-decay", type=NON_NEGATIVE_FLOAT, default=1e-4, show_default=True, help="LARS weight decay.")
@click.option(
    "--warmup-epochs", type=NON_NEGATIVE_FLOAT, default=10.0, show_default=True, help="Capped at a tenth of the run."
)
@click.option(
    "--vicreg-weights",
    "vicreg_coefficients",
    type=NonNegativeFloats(3),
    default="25,50,1",
    show_default=True,
    help="VICReg's invariance, variance, covariance weights, the variance hinge averaged over the views (default: "
    "solo-learn's VICReg, which sums it over two views at 25; Bardes et al.'s own is 25,25,1).",
)
@click.option(
    "--tcr-eps", type=POSITIVE_FLOAT, default=0.2, show_default=True, help="Precision epsilon of TCR's coding rate."
)
@click.option(
    "--tcr-lambda", type=NON_NEGATIVE_FLOAT, default=200.0, show_default=True, help="Weight of TCR's invariance term."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    callback=out_dir,
    help="Run folder: last.ckpt, config.json.",
)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue the run found in --out.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="auto: bf16 on CUDA, fp32 on CPU.",
)
@click.option(
    "--channels-last/--no-channels-last", default=True, show_default=True, help="Channels-last memory (CUDA)."
)
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(["auto", *COMPILE_MODES]),
    default="auto",
    show_default=True,
    help="torch.compile views, model and loss; cudagraphs: also replay them as CUDA graphs; auto: cudagraphs on "
    f"CUDA for runs of at least {AUTO_COMPILE_STEPS:,} steps.",
)
@click.option(
    "--interpolation",
    type=click.Choice(INTERPOLATIONS),
    default="bicubic",
    show_default=True,
    help="Resampling of the views' crops.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the weights and the views.")
@click.option("--log-every", type=POSITIVE, default=50, show_default=True, help="Steps between logged losses (a sync).")
@click.option("--save-every", type=POSITIVE, default=1, show_default=True, help="Epochs between checkpoints.")
@click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME).")
@click.option("--download/--no-download", default=False, show_default=True, help="torchvision download.")
def pretrain_cmd(scale: str, out: str, resume: bool, compile_: str, **options) -> None:
    """I²VICReg / TCR pretraining on fixed-scale patches.

    Prints one JSON line when done.
    """
    from ssl_patchbench.pretrain.train import PretrainConfig, pretrain

    cfg = PretrainConfig(scale=scale, compile=compile_, **options)
    start = time.perf_counter()
    if stderr.is_terminal:
        with RichReporter() as reporter:
            result = pretrain(cfg, Path(out), resume=resume, reporter=reporter)
    else:
        result = pretrain(cfg, Path(out), resume=resume, reporter=LineReporter())
    click.echo(json.dumps(summary(cfg, result, time.perf_counter() - start)))
    sys.stdout.flush()

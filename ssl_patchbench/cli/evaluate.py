"""``patchbench eval`` and ``patchbench demo``: options in, a table (or JSON rows) out; the work is in ``pipeline``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
from rich.table import Table

from ssl_patchbench.cli.common import build_config, eval_options, progress, stderr, stdout
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.pipeline.config import EvalConfig


@click.command("eval")
@eval_options
def eval_cmd(as_json: bool, nproc: int, **options) -> None:
    """Evaluate a checkpoint with kNN and linear probes.

    One kNN and linear-probe evaluation per representation (central view, bags of patches, sliding windows),
    aggregation and space, all cut from one pass over each split (docs/protocol.md). E.g. CIFAR-10's central,
    1, 16, 256 patches, 25 sliding windows (mean and gridpool) and central in the projection space:

    \b
      patchbench eval --model M --dataset cifar10 --patches central,1,16,256,sliding \\
        --patch-size 16 --stride 4 --aggregate mean,gridpool --space embedding,projection:central
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(nproc)
    run_eval(build_config(options), as_json=as_json)


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with ``nproc`` processes on this node, then exit with its code."""
    args = sys.argv[1:]
    at = next(i for i, a in enumerate(args) if a == "--nproc" or a.startswith("--nproc="))
    del args[at : at + (1 if "=" in args[at] else 2)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ssl_patchbench",
        *args,
    ]
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        click.echo(
            f"error: the {nproc}-process run failed (exit {code}, see above); its finished chunks are kept: "
            "rerun the same command to resume",
            err=True,
        )
    sys.exit(code)


def run_eval(cfg: EvalConfig, *, as_json: bool) -> None:
    """Evaluate ``cfg`` with progress bars, then print the files left out (one warning line per split) and the
    table (or JSON rows)."""
    from ssl_patchbench.data.decode import ImageFileError
    from ssl_patchbench.pipeline.evaluate import evaluate
    from ssl_patchbench.results.records import skipped_notes

    try:
        with progress() as factory:
            results = evaluate(cfg, progress=factory)
    except ImageFileError as exc:
        if cfg.skip_bad_images:  # the file passed the check yet does not decode: the error as it is
            raise
        raise UserError(
            f"{exc}, or rerun with --skip-bad-images to leave out every file that cannot be decoded (each is named "
            "in the results)"
        ) from exc
    if not results:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    for note in skipped_notes(results[0].record):
        stderr.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
    rows = [r.row() for r in results]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        stdout.print(_table(f"{cfg.model} on {cfg.dataset}", rows))


def _table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    knn_columns = [key for key in rows[0] if key.startswith("knn@") and any(r[key] is not None for r in rows)]
    spaces = ["space"] if any(r["space"] != "embedding" for r in rows) else []  # shown when not all embedding
    columns = ("patches", "mode", "aggregation", *spaces, *knn_columns, "linear", "dim", "images/s", "patches/s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("mode", "aggregation", "space") else "right")
    for r in rows:
        table.add_row(
            str(r["patches"]),
            r["mode"],
            r["aggregation"],
            *(r[key] for key in spaces),
            *(_pct(r[key]) for key in knn_columns),
            _pct(r["linear"]),
            str(r["dim"]),
            f"{r['images_per_s']:,.0f}",
            f"{r['patches_per_s']:,.0f}",
        )
    return table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


@click.command()
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True, help="Pretraining epochs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per representation.")
def demo(epochs: int, device: str, home: str | None, as_json: bool) -> None:
    """Offline end-to-end run on scikit-learn digits.

    Pretrains a tiny VICReg model on scikit-learn digits (no download), then evaluates it.
    """
    from ssl_patchbench.cli.pretrain import LineReporter, RichReporter
    from ssl_patchbench.core.paths import home as default_home
    from ssl_patchbench.pretrain.train import pretrain_demo_model

    root = Path(home) if home else default_home()
    stderr.print(f"pretraining a tiny VICReg model on scikit-learn digits ({epochs} epochs, offline)...")
    if stderr.is_terminal:
        with RichReporter() as reporter:
            checkpoint = pretrain_demo_model(root / "demo", epochs=epochs, device=device, reporter=reporter)
    else:
        checkpoint = pretrain_demo_model(root / "demo", epochs=epochs, device=device, reporter=LineReporter())
    stderr.print(f"checkpoint: {checkpoint}")
    cfg = EvalConfig(
        model="tiny_cifar", dataset="digits", checkpoint=str(checkpoint), scale=(0.2, 0.2), device=device, home=root
    )
    run_eval(cfg, as_json=as_json)
    results = root / "results.jsonl"
    stderr.print(
        f"results appended to {results}\n"
        "try next:\n"
        f"  patchbench results --results {results}   (the stored records)\n"
        f"  patchbench report --results {results}   (one HTML page with the figures)\n"
        "  patchbench zoo list   (checkpoints to evaluate with patchbench eval on your own data)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )

"""The ``patchbench`` command: click commands, rich progress and tables, no logic of its own.

Heavy modules (torch) are imported inside the commands, so ``patchbench --help`` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError

stderr = Console(stderr=True)
stdout = Console(width=None if sys.stdout.isatty() else 200)  # piped tables are not cut at 80 columns


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _floats(value: str | None, name: str) -> tuple[float, float] | None:
    """``0.2`` -> (0.2, 0.2); ``0.08,1`` -> (0.08, 1.0)."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.replace(":", ",").split(",")]
    except ValueError:
        raise UserError(f"{name} takes a number or a pair like 0.08,1.0, got {value!r}") from None
    if len(parts) not in (1, 2):
        raise UserError(f"{name} takes a number or a pair like 0.08,1.0, got {value!r}")
    return (parts[0], parts[-1])


def _ints(value: str, name: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in _csv(value))
    except ValueError:
        raise UserError(f"{name} takes comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) <= 0:
        raise UserError(f"{name} takes positive integers, got {value!r}")
    return numbers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ssl-patchbench")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Evaluate self-supervised image checkpoints with bags of patch embeddings."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def eval_options(func):
    """The options of ``eval`` (and ``demo``, which fills some in)."""
    options = [
        click.option(
            "--checkpoint", type=click.Path(dir_okay=False), help="Local checkpoint; overrides the zoo source."
        ),
        click.option("--data-dir", type=click.Path(file_okay=False), help="ImageFolder tree or torchvision root."),
        click.option(
            "--patches",
            default="central,1,16",
            show_default=True,
            help="Representations: central, patch counts, or all (sliding).",
        ),
        click.option("--mode", type=click.Choice(["random", "grid", "sliding"]), default="random", show_default=True),
        click.option("--patch-scale", help="Area fraction (0.2) or range (0.08,1.0); default: pretraining scale."),
        click.option("--patch-size", type=int, help="Patch side in px (sliding windows, or fixed-size random)."),
        click.option("--stride", type=int, help="Sliding-window stride in px."),
        click.option(
            "--aggregate",
            default="mean",
            show_default=True,
            help="mean, concat, gridpool[:K:S]; comma-separate several.",
        ),
        click.option("--space", type=click.Choice(["embedding", "projection"]), default="embedding", show_default=True),
        click.option("--eval", "evals", default="knn,linear", show_default=True, help="knn, linear or both."),
        click.option("--knn-k", default="20,200", show_default=True, help="Neighbour counts of the kNN."),
        click.option("--temperature", type=float, default=0.07, show_default=True, help="kNN vote temperature."),
        click.option(
            "--knn-backend",
            type=click.Choice(["auto", "torch", "faiss"]),
            default="auto",
            show_default=True,
            help="auto: tiled matmul on the device; faiss: IndexFlatIP on the CPU.",
        ),
        click.option("--train-per-class", type=int, help="Keep the first N train images of each class."),
        click.option("--test-per-class", type=int, help="Keep the first N test images of each class."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i]."),
        click.option(
            "--precision",
            type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
            default="auto",
            show_default=True,
            help="Forward precision (auto: bf16 on CUDA, fp32 on CPU).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the patch boxes."),
        click.option(
            "--max-patches", type=click.IntRange(min=1), help="Patches per forward pass (default: from the GPU budget)."
        ),
        click.option(
            "--compile",
            "compile_",
            type=click.Choice(["auto", "on", "off"]),
            default="auto",
            show_default=True,
            help="torch.compile the model (auto: on CUDA for representations of at least 4M patches, train + test).",
        ),
        click.option(
            "--chunk-rows",
            type=int,
            default=4096,
            show_default=True,
            help="Images per resumable store chunk (and per rank's share of work).",
        ),
        click.option(
            "--nproc",
            type=int,
            default=1,
            show_default=True,
            help="Processes (one per GPU) launched through torchrun; see docs/distributed.md.",
        ),
        click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME)."),
        click.option("--results", type=click.Path(dir_okay=False), help="Results JSONL (default HOME/results.jsonl)."),
        click.option(
            "--trust-checkpoint/--no-trust-checkpoint",
            default=False,
            show_default=True,
            help="Allow checkpoints that need pickle (can run code: only for files you trust).",
        ),
        click.option(
            "--download/--no-download",
            default=False,
            show_default=True,
            help="Let torchvision download CIFAR/STL (needs internet).",
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per line per representation."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command("eval")
@click.option("--model", required=True, help="Zoo entry (patchbench zoo list).")
@click.option("--dataset", required=True, help="cifar10, cifar100, stl10, imagenet, imagenette, folder, digits.")
@eval_options
def eval_cmd(model: str, dataset: str, **options) -> None:
    """Evaluate a checkpoint: kNN and linear probe for each representation."""
    as_json = options.pop("as_json")
    nproc = options.pop("nproc")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(nproc)
    _run_eval(_config(model, dataset, **options), as_json=as_json)


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


def _config(model: str, dataset: str, **o):
    from .api import EvalConfig

    return EvalConfig(
        model=model,
        dataset=dataset,
        checkpoint=o["checkpoint"],
        data_dir=o["data_dir"],
        patches=_csv(o["patches"]),
        mode=o["mode"],
        scale=_floats(o["patch_scale"], "--patch-scale"),
        size=o["patch_size"],
        stride=o["stride"],
        aggregations=_csv(o["aggregate"]),
        space=o["space"],
        evals=_csv(o["evals"]),
        knn_ks=_ints(o["knn_k"], "--knn-k"),
        temperature=o["temperature"],
        knn_backend=o["knn_backend"],
        train_per_class=o["train_per_class"],
        test_per_class=o["test_per_class"],
        device=o["device"],
        precision=o["precision"],
        seed=o["seed"],
        max_patches=o["max_patches"],
        compile=o["compile_"],
        chunk_rows=o["chunk_rows"],
        home=Path(o["home"]) if o["home"] else None,
        results_path=Path(o["results"]) if o["results"] else None,
        trust_checkpoint=o["trust_checkpoint"],
        download=o["download"],
    )


def _run_eval(cfg, *, as_json: bool) -> None:
    """Evaluate ``cfg`` with progress bars, then print the table (or JSON rows)."""
    from .api import evaluate

    with _progress() as factory:
        results = evaluate(cfg, progress=factory)
    if not results:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    rows = [r.row() for r in results]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        stdout.print(_table(f"{cfg.model} on {cfg.dataset}", rows))


class _progress:
    """A rich progress bar per extraction, showing images/s and patches/s (on stderr)."""

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


def _table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    knn_columns = [key for key in rows[0] if key.startswith("knn@") and any(r[key] is not None for r in rows)]
    columns = ("patches", "mode", "aggregation", *knn_columns, "linear", "dim", "images/s", "patches/s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("mode", "aggregation") else "right")
    for r in rows:
        table.add_row(
            str(r["patches"]),
            r["mode"],
            r["aggregation"],
            *(_pct(r[key]) for key in knn_columns),
            _pct(r["linear"]),
            str(r["dim"]),
            f"{r['images_per_s']:,.0f}",
            f"{r['patches_per_s']:,.0f}",
        )
    return table


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


@cli.group()
def zoo() -> None:
    """The model zoo (model_zoo.yaml)."""


@zoo.command("list")
def zoo_list() -> None:
    """List the zoo's entries."""
    from .zoo import list_entries

    table = Table(title="patchbench model zoo")
    for column in ("name", "arch", "source", "input", "pretrain scale", "description"):
        table.add_column(column)
    for e in list_entries():
        source = "--checkpoint" if e.needs_checkpoint else (e.source.url or e.source.hub_repo or "timm")
        table.add_row(
            e.name,
            f"{e.arch} ({e.stem})",
            source,
            str(e.preprocessing.input_size),
            f"{e.pretrain_scale[0]:g}-{e.pretrain_scale[1]:g}",
            e.description,
        )
    stdout.print(table)


@zoo.command("show")
@click.argument("name")
def zoo_show(name: str) -> None:
    """Show one entry in full."""
    import yaml

    from .zoo import get_entry

    click.echo(yaml.safe_dump(get_entry(name).to_dict(), sort_keys=False))


@cli.command()
@click.option("--epochs", type=int, default=15, show_default=True, help="Pretraining epochs of the demo model.")
@click.option("--device", default="auto", show_default=True)
@click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME).")
@click.option("--json", "as_json", is_flag=True)
def demo(epochs: int, device: str, home: str | None, as_json: bool) -> None:
    """Offline end-to-end run: pretrain a tiny VICReg model on scikit-learn digits, then evaluate it."""
    from .api import EvalConfig
    from .paths import home as default_home
    from .pretrain import pretrain_demo_model

    root = Path(home) if home else default_home()
    stderr.print(f"pretraining a tiny VICReg model on scikit-learn digits ({epochs} epochs, offline)...")
    checkpoint = pretrain_demo_model(root / "demo", epochs=epochs, device=device)
    stderr.print(f"checkpoint: {checkpoint}")
    cfg = EvalConfig(
        model="tiny_cifar", dataset="digits", checkpoint=str(checkpoint), scale=(0.2, 0.2), device=device, home=root
    )
    _run_eval(cfg, as_json=as_json)


# Commands that live in their own modules are registered here, one line each; those modules import
# torch only inside their commands, so `patchbench --help` stays instant.
from .cli_analysis import converge, report, viz  # noqa: E402

cli.add_command(converge)
cli.add_command(viz)
cli.add_command(report)
from .cli_pretrain import pretrain_cmd  # noqa: E402

cli.add_command(pretrain_cmd)

from .cli_report import check, results, table  # noqa: E402

cli.add_command(table)
cli.add_command(results)
cli.add_command(check)


def main() -> None:
    """Entry point: user errors end with one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        stderr.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted: finished chunks are kept; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()

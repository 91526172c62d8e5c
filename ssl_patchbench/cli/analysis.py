"""Click commands of the analyses: ``converge``, ``viz neighbors|heatmap|scales`` and ``report``.

Wiring only: options are turned into calls of ``ssl_patchbench.analysis``; torch and matplotlib are imported
inside the commands so that ``patchbench --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ssl_patchbench.cli.common import POSITIVE, SEED, out_dir, out_file, progress, split_csv, stderr
from ssl_patchbench.core.errors import UserError

_CHECKPOINT_HELP = "Checkpoint path or URL; overrides the zoo source."
_TRUST_HELP = "Allow checkpoints that need pickle (can run code: only for files you trust)."
_METRIC_HELP = "Top-1 accuracy of which evaluation."
_out_dir_option = click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="patchbench_analysis",
    show_default=True,
    callback=out_dir,
    help="Folder for the figures, CSV and JSON files.",
)


def _model_options(func):
    """Options shared by every analysis that embeds images."""
    options = [
        click.option("--model", required=True, help="Zoo entry (patchbench zoo list)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False), help=_CHECKPOINT_HELP),
        click.option("--dataset", required=True, help="cifar10, cifar100, stl10, imagenette, folder, digits, ..."),
        click.option("--data-dir", type=click.Path(file_okay=False), help="ImageFolder tree or torchvision root."),
        click.option(
            "--split", type=click.Choice(["train", "test"]), default="test", show_default=True, help="Which split."
        ),
        click.option("--space", default="auto", show_default=True, help="embedding, projection, or both (auto)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i] (always float32)."),
        click.option("--max-patches", type=POSITIVE, help="Patches per forward pass (default: from the device)."),
        _out_dir_option,
        click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME)."),
        click.option("--trust-checkpoint/--no-trust-checkpoint", default=False, show_default=True, help=_TRUST_HELP),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _setup(o: dict, per_class: int | None, factory=None):
    """(inputs, embedder, spaces) from the shared options; ``factory``: the progress display of the batches."""
    from ssl_patchbench.analysis.embed import PatchEmbedder, open_inputs
    from ssl_patchbench.core.devices import resolve_device, use_available_cores

    device = resolve_device(o["device"])
    if device.type == "cpu":
        use_available_cores()
    inputs = open_inputs(
        model=o["model"],
        checkpoint=o["checkpoint"],
        dataset=o["dataset"],
        data_dir=o["data_dir"],
        split=o["split"],
        per_class=per_class,
        trust_checkpoint=o["trust_checkpoint"],
        root=Path(o["home"]) if o["home"] else None,
    )
    if o["space"] == "auto":
        spaces = ("embedding", "projection") if inputs.model.projector is not None else ("embedding",)
    else:
        spaces = split_csv(o["space"])
    return inputs, PatchEmbedder(inputs.model, device, o["max_patches"], progress=factory), spaces


def _all_images(inputs):
    import numpy as np

    return np.arange(len(inputs.split))


def _wrote(paths: list[Path]) -> None:
    for path in paths:
        click.echo(f"wrote {path}", err=True)


def _window_options(size: int, stride: int):
    def decorate(func):
        func = click.option("--stride", type=POSITIVE, default=stride, show_default=True, help="Window stride (px).")(
            func
        )
        return click.option(
            "--patch-size", type=POSITIVE, default=size, show_default=True, help="Window side, model-input px."
        )(func)

    return decorate


@click.command()
@_model_options
@_window_options(16, 4)
@click.option("--per-class", type=POSITIVE, default=10, show_default=True, help="Images per class (the first ones).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of each image's window order.")
def converge(per_class: int, patch_size: int, stride: int, seed: int, **o) -> None:
    """Figure 3a: how fast the bag of patches converges.

    Cosine similarity of the mean of N patch embeddings to the central and all-patch embeddings.
    """
    from ssl_patchbench.analysis.converge import run_converge, write_converge

    with progress() as factory:
        inputs, embedder, spaces = _setup(o, per_class, factory)
        result = run_converge(
            inputs, embedder, images=_all_images(inputs), size=patch_size, stride=stride, spaces=spaces, seed=seed
        )
    click.echo(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    _wrote(write_converge(result, Path(o["out"])))


@click.group()
def viz() -> None:
    """Figures: neighbours, heatmaps, accuracy by scale.

    Patch neighbours (Fig. 4), similarity heatmaps (Fig. 5), accuracy against pretraining scale (Fig. 2).
    """


@viz.command()
@_model_options
@_window_options(16, 4)
@click.option("--per-class", type=POSITIVE, default=20, show_default=True, help="Bank images per class.")
@click.option("--queries", type=POSITIVE, default=500, show_default=True, help="Query patches for the statistics.")
@click.option("-k", "--k", "k", type=POSITIVE, default=10, show_default=True, help="Neighbours per query.")
@click.option("--show", type=click.IntRange(min=0), default=6, show_default=True, help="Queries drawn in the figure.")
@click.option("--show-k", type=POSITIVE, default=5, show_default=True, help="Neighbours drawn per query and space.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the query choice.")
@click.option(
    "--other-images/--any-image",
    default=False,
    show_default=True,
    help="Figure and CSV: neighbours from other images only, or from any other patch (stats hold both).",
)
def neighbors(
    per_class: int,
    patch_size: int,
    stride: int,
    queries: int,
    k: int,
    show: int,
    show_k: int,
    seed: int,
    other_images: bool,
    **o,
) -> None:
    """Figure 4: nearest patches, embedding vs projection.

    Nearest patches in embedding vs projection space, and where they come from (JSON stats).
    """
    from ssl_patchbench.analysis.neighbors import run_neighbors
    from ssl_patchbench.analysis.neighbors_plot import write_neighbors

    if queries <= 0 or k <= 0:
        raise UserError(f"--queries and -k must be positive, got {queries} and {k}")
    with progress() as factory:
        inputs, embedder, spaces = _setup(o, per_class, factory)
        result = run_neighbors(
            inputs,
            embedder,
            images=_all_images(inputs),
            size=patch_size,
            stride=stride,
            spaces=spaces,
            queries=queries,
            k=k,
            seed=seed,
            other_images=other_images,
        )
    click.echo(json.dumps(result.stats_json()["spaces"], indent=2))
    _wrote(write_neighbors(result, inputs, Path(o["out"]), show=show, show_k=show_k))


@viz.command()
@_model_options
@_window_options(16, 2)
@click.option("--images", "image_list", help="Image indices in the split (default: first image of 3 classes).")
@click.option("--query", default="center", show_default=True, help="Query window: center, or ROW,COL in the grid.")
def heatmap(image_list: str | None, query: str, patch_size: int, stride: int, **o) -> None:
    """Figure 5: patch similarity heatmaps.

    Similarity of every window of an image to a query window, embedding vs projection.
    """
    import numpy as np

    from ssl_patchbench.analysis.heatmap import run_heatmap, write_heatmap
    from ssl_patchbench.data.datasets import first_per_class

    inputs, embedder, spaces = _setup(o, None)
    if image_list:
        images = np.array([_int(v, "--images") for v in split_csv(image_list)])
        if images.min() < 0 or images.max() >= len(inputs.split):
            raise UserError(f"--images must lie in 0..{len(inputs.split) - 1}")
    else:
        images = first_per_class(inputs.split.labels, 1)[:3]
    where = "center" if query == "center" else tuple(_int(v, "--query") for v in split_csv(query))
    if where != "center" and len(where) != 2:
        raise UserError(f"--query takes center or ROW,COL, got {query!r}")
    result = run_heatmap(inputs, embedder, images=images, query=where, size=patch_size, stride=stride, spaces=spaces)
    _wrote(write_heatmap(result, inputs, Path(o["out"])))


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} takes integers, got {value!r}") from None


def _records(results: str | None, home: str | None) -> tuple[Path, list[dict]]:
    from ssl_patchbench.core.paths import home as default_home
    from ssl_patchbench.results.store import read_records

    path = Path(results) if results else (Path(home) if home else default_home()) / "results.jsonl"
    return path, read_records(path)


@viz.command()
@click.option("--results", type=click.Path(dir_okay=False), help="Results JSONL (default HOME/results.jsonl).")
@click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME).")
@click.option(
    "--metric",
    type=click.Choice(["linear", "knn@20", "knn@200"]),
    default="linear",
    show_default=True,
    help=_METRIC_HELP,
)
@click.option("--dataset", help="Dataset of the records to plot (needed when they hold several).")
@click.option("--model", help="Only the records of this zoo entry.")
@click.option(
    "--space",
    type=click.Choice(["embedding", "projection"]),
    default="embedding",
    show_default=True,
    help="Records of backbone or projector features.",
)
@click.option("--scale-label", multiple=True, help="KEY=LABEL: pretraining scale of a model, checkpoint or sha256.")
@_out_dir_option
def scales(results, home, metric, dataset, model, space, scale_label, out) -> None:
    """Figure 2: accuracy against pretraining scale.

    Accuracy against pretraining scale and number of patches, from stored results records; one data split and
    protocol per figure, one checkpoint per curve (what does not fit is left out with a note).
    """
    from ssl_patchbench.analysis.scales import parse_labels, scale_table, write_scales

    path, records = _records(results, home)
    if not records:
        raise UserError(f"no results records in {path}: run `patchbench eval ...` first, or pass --results FILE")
    labels = parse_labels(scale_label)
    scales = scale_table(records, metric=metric, dataset=dataset, space=space, labels=labels, model=model)
    shown = scales.table[["scale", "representation", "accuracy", "n_records"]]
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for note in scales.notes:
        stderr.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    _wrote(write_scales(scales.table, Path(out)))


@click.command()
@click.option("--results", type=click.Path(dir_okay=False), help="Results JSONL (default HOME/results.jsonl).")
@click.option("--model", help="Zoo entry: add its image analyses and keep only its records.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help=_CHECKPOINT_HELP)
@click.option("--dataset", help="Dataset of the image analyses (with --model).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="ImageFolder tree or torchvision root.")
@click.option("--per-class", type=POSITIVE, default=10, show_default=True, help="Images per class of the analyses.")
@click.option(
    "--metric",
    type=click.Choice(["linear", "knn@20", "knn@200"]),
    default="linear",
    show_default=True,
    help=_METRIC_HELP,
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--home", type=click.Path(file_okay=False), help="Cache root (default $PATCHBENCH_HOME).")
@click.option("--trust-checkpoint/--no-trust-checkpoint", default=False, show_default=True, help=_TRUST_HELP)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="patchbench_report.html",
    show_default=True,
    callback=out_file,
    help="The HTML file.",
)
def report(
    results, model, checkpoint, dataset, data_dir, per_class, metric, device, home, trust_checkpoint, out
) -> None:
    """One self-contained HTML report.

    The results records and, with --model, the image analyses, on one page with every figure inline.
    """
    from ssl_patchbench.analysis.report import model_sections, records_sections, render_html
    from ssl_patchbench.data.datasets import first_per_class
    from ssl_patchbench.results.records import select_records

    path, records = _records(results, home)
    sections, meta, sha = [], {"results": str(path)}, None
    if model:
        if not dataset:
            raise UserError("--model needs --dataset (and usually --data-dir) for the image analyses")
        o = dict(
            model=model,
            checkpoint=checkpoint,
            dataset=dataset,
            data_dir=data_dir,
            split="test",
            space="auto",
            device=device,
            max_patches=None,
            home=home,
            trust_checkpoint=trust_checkpoint,
        )
        with progress() as factory:
            inputs, embedder, _ = _setup(o, per_class, factory)
            sha = inputs.model.checkpoint_sha256
            meta.update(model=model, checkpoint=inputs.model.checkpoint, sha256=sha[:12], data=f"{dataset} test")
            images = _all_images(inputs)
            sections = model_sections(
                inputs,
                embedder,
                converge_images=images,
                bank_images=images,
                heatmap_images=first_per_class(inputs.split.labels, 1)[:3],
            )
    kept = select_records(records, model=model, checkpoint=sha)
    meta["records"] = f"{len(kept)} of {len(records)} in the results file"
    sections = records_sections(kept, metric=metric) + sections
    if not sections:
        raise UserError(f"nothing to report: no results records in {path}; run `patchbench eval` or pass --model")
    title = f"patchbench report: {model}" if model else "patchbench report"
    try:
        out.write_text(render_html(title, sections, meta))
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from exc
    _wrote([out])

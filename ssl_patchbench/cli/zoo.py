"""``patchbench zoo list`` and ``patchbench zoo show``."""

from __future__ import annotations

import click
from rich.table import Table

from ssl_patchbench.cli.common import stdout


@click.group()
def zoo() -> None:
    """The model zoo (model_zoo.yaml)."""


@zoo.command("list")
def zoo_list() -> None:
    """List the zoo's entries."""
    from ssl_patchbench.models.registry import list_entries

    table = Table(title="patchbench model zoo")
    for column in ("name", "arch", "source", "input", "patch scale", "pretrain crop", "description"):
        table.add_column(column)
    for e in list_entries():
        source = "--checkpoint" if e.needs_checkpoint else (e.source.url or e.source.hub_repo or "timm")
        table.add_row(
            e.name,
            f"{e.arch} ({e.stem})",
            source,
            str(e.preprocessing.input_size),
            _scale(e.patch_scale),
            _scale(e.pretrain_crop_scale),
            e.description,
        )
    stdout.print(table)
    stdout.print("patch scale: the default --patch-scale; pretrain crop: the model's own RandomResizedCrop scale")


def _scale(scale: tuple[float, float] | None) -> str:
    return "-" if scale is None else f"{scale[0]:g}-{scale[1]:g}"


@zoo.command("show")
@click.argument("name")
def zoo_show(name: str) -> None:
    """Show one entry in full."""
    import yaml

    from ssl_patchbench.models.registry import get_entry

    click.echo(yaml.safe_dump(get_entry(name).to_dict(), sort_keys=False))

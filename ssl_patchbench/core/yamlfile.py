"""YAML files read safely and within bounds: the zoo, table specs and bindings are written by users.

``yaml.safe_load`` builds no objects, but it happily expands aliases: a few hundred bytes of nested ``*a`` make
billions of nodes for whatever walks the result (a "billion laughs"). Here the file's size is capped, and the
document is composed first and its expanded size counted (aliases counted every time they are used, a
recursive alias refused) before anything is constructed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ssl_patchbench.core.errors import UserError

MAX_YAML_BYTES = 4 << 20
MAX_YAML_NODES = 200_000  # expanded: the packaged zoo has ~1,500, the paper's tables ~2,500


def read_yaml(path: Path, what: str = "") -> object:
    """The parsed document (None when empty); an oversized, alias-bombed or malformed file is a UserError whose
    message starts ``cannot read {what}{path}`` (``what``: e.g. ``"zoo file "``)."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise UserError(
                f"cannot read {what}{path}: it is {size:,} bytes, more than the {MAX_YAML_BYTES:,} a YAML file "
                "here may hold"
            )
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what}{path} ({_reason(exc)}): fix or remove it") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, f"{what}{path}")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise UserError(f"cannot read {what}{path} ({_reason(exc)}): fix or remove it") from exc
    except RecursionError as exc:
        raise UserError(f"cannot read {what}{path}: it is nested too deeply; flatten it") from exc
    finally:
        loader.dispose()


def _count_nodes(root: yaml.Node, where: str) -> None:
    """Refuse a document whose aliases expand to more than ``MAX_YAML_NODES`` nodes, or into themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UserError(f"cannot read {where}: a YAML alias refers to a node that contains it")
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise UserError(
                    f"cannot read {where}: its aliases expand to more than {MAX_YAML_NODES:,} YAML nodes "
                    "(an alias bomb?); write the values out or use fewer aliases"
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

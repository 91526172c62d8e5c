"""The architecture as a test: rooms in floors, imports pointing down only, and every module importable alone."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_patchbench"
# Lower floors first; a module may import its own room and the rooms of lower floors, nothing above.
FLOORS = (
    ("core",),
    ("sampling", "data", "evaluators", "results"),
    ("models",),
    ("features", "pretrain"),
    ("pipeline",),
    ("analysis", "reporting"),
    ("cli",),
)
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def _module(path: Path) -> str:
    return ".".join(("ssl_patchbench", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


MODULES = sorted(_module(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOOR) else None


def _imports(path: Path, module: str) -> set[str]:
    """Every ssl_patchbench module ``path`` imports, at module level or inside functions, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("ssl_patchbench")}


def test_every_module_lives_in_a_room():
    loose = [m for m in MODULES if m != "ssl_patchbench" and _room(m) is None]
    assert not loose, f"modules outside the rooms of the architecture: {loose}"


def test_imports_point_down_only():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        room = _room(module)
        if room is None:
            continue
        for target in _imports(path, module):
            other = _room(target)
            if other is not None and other != room and FLOOR[other] >= FLOOR[room]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point sideways or up:\n" + "\n".join(sorted(upward))


def test_every_module_imports_alone_in_a_fresh_interpreter():
    # One interpreter; before each module every ssl_patchbench module is forgotten (torch and friends stay loaded),
    # so each is imported first, as alone: an import cycle shows only when its module comes first.
    code = (
        "import importlib, sys, traceback\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('ssl_patchbench')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True, check=True)
    assert not done.stdout.strip(), done.stdout

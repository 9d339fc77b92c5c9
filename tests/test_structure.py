"""The package's structure: every module in its layer, imports only downwards, no import circle;
and the names that several places share are listed once."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import CONF, ROOT

# From the ground up. A module may import modules of its own layer (without a circle) and of the
# layers below it, never those above.
LAYERS = [
    ("the error type", {"errors"}),
    ("config and the command-line layer", {"config", "cli", "extras", "run_context"}),
    ("plain PyTorch", {"idx", "network", "checkpoint", "pictures", "inference", "atomic", "plots", "run_files",
                       "offline_digits", "slurm_job"}),
    ("the Lightning layer", {"data", "model", "callbacks", "console", "tracking", "sweep", "journal", "rendezvous"}),
    ("entry points", {"train", "predict", "app", "export", "tune", "evaluate"}),
]


def imports_of_src(path: Path) -> set[str]:
    """The src modules a file of src/ imports, anywhere in it (imports inside functions count too), absolute
    (`from src.x import y`, `import src.x`) or relative (`from . import x`, `from .x import y`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1:  # above src/: not one of its modules
                continue
            # `from .x import y` in src/ is `from src.x import y`
            module = ".".join(filter(None, ["src" if node.level == 1 else None, node.module]))
            if module == "src":
                found |= {alias.name for alias in node.names}
            elif module.startswith("src."):
                found.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("src.")}
    return found


def import_graph(src: Path = ROOT / "src") -> dict[str, set[str]]:
    return {path.stem: imports_of_src(path) - {path.stem} for path in src.glob("*.py") if path.stem != "__init__"}


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    layer = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
    problems = [f"src/{module}.py has no layer in tests/test_structure.py" for module in graph if module not in layer]
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            if module in layer and other in layer and layer[other] > layer[module]:
                problems.append(f"src/{module}.py ({LAYERS[layer[module]][0]}) imports src/{other}.py "
                                f"({LAYERS[layer[other]][0]}), a layer above it")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, found by a depth-first search from each module."""
    found = []

    def visit(module: str, path: list[str]) -> None:
        for other in sorted(graph.get(module, ())):
            if other == path[0]:
                found.append(path + [other])
            elif other not in path and other > path[0]:  # each circle once, from its smallest module
                visit(other, path + [other])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_every_module_imports_only_its_own_layer_and_those_below():
    assert layering_problems(import_graph()) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """A circle, an upward import and a module without a layer are each reported, whether the import is
    absolute or relative."""
    (tmp_path / "errors.py").write_text("from src.config import x\n")
    (tmp_path / "config.py").write_text("def f():\n    from src import errors\n")
    (tmp_path / "idx.py").write_text("import src.train\n")
    (tmp_path / "network.py").write_text("from . import train\n")
    (tmp_path / "pictures.py").write_text("def f():\n    from .predict import main\n")
    (tmp_path / "data.py").write_text("from .model import x\nfrom . import idx\nfrom .. import tests\n")
    (tmp_path / "model.py").write_text("from . import data\n")
    (tmp_path / "novel.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["data"] == {"model", "idx"} and graph["network"] == {"train"}
    assert circles(graph) == [["config", "errors", "config"], ["data", "model", "data"]]
    assert layering_problems(graph) == [
        "src/novel.py has no layer in tests/test_structure.py",
        "src/errors.py (the error type) imports src/config.py (config and the command-line layer), a layer above it",
        "src/idx.py (plain PyTorch) imports src/train.py (entry points), a layer above it",
        "src/network.py (plain PyTorch) imports src/train.py (entry points), a layer above it",
        "src/pictures.py (plain PyTorch) imports src/predict.py (entry points), a layer above it"]


def test_the_optimizers_and_datasets_are_the_config_groups_options():
    from src.config import DATASETS, OPTIMIZERS

    assert sorted(OPTIMIZERS) == sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    assert sorted(DATASETS) == sorted(p.stem for p in (CONF / "data").glob("*.yaml"))

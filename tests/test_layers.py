"""The import layers of dpfeta (docs/architecture.md), checked by walking every module's AST, function-
local imports included, so the layering cannot rot: privacy imports nothing of data, pipeline,
tracking or Ray; the pure math imports no I/O; nothing imports upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dpfeta"

# part -> the dpfeta parts it may import (besides itself). A part is a top-level module or package.
BASE = {"config", "rng", "images", "checkpoint", "runlock", "storage", "progress", "console"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "rng": set(),
    "runlock": set(),
    "storage": {"config"},  # config.is_uri, the one URI test
    "progress": set(),  # tqdm bars; the Ray actor that forwards rank 0's DP-SGD progress
    "console": {"progress"},  # where output goes: the console, the run's log file
    "mlflow_model": {"config", "rng", "sample", "release"},  # the pyfunc sampler and its logger
    "images": set(),
    "checkpoint": set(),
    "dpsgd": set(),
    "precision": {"config"},
    "privacy": {"config"},
    "nn": {"config"},
    "data": {"config", "images"},
    "diffusion": set(),  # the math: torch only
    "sample": BASE | {"nn", "diffusion", "precision", "cluster"},  # a shard runs as a GPU task
    "release": {"config", "privacy"},
    "tracking": {"config", "release", "console"},
    "cluster": {"config", "console"},  # where code runs; knows no MLflow run
    "central": BASE | {"privacy", "data"},
    "augment": {"config"},  # batched RandAugment on the tensors' device (the op names from config.schema)
    "warmup": BASE | {"cluster", "diffusion", "nn", "precision", "augment"},
    "finetune": BASE | {"privacy", "dpsgd", "diffusion", "nn", "precision"},
    "evaluate": BASE | {"cluster", "data", "nn", "privacy", "precision"},  # FID features in bf16 (run.precision)
    "distributed": BASE | {"cluster", "data", "finetune", "privacy", "tracking"},
    "runplan": {"config", "data", "privacy", "release", "tracking", "storage", "evaluate"},  # the one way in
    "rundir": BASE | {"data", "privacy", "release", "tracking"},  # the run's folder and spending protocol
    "pipeline": BASE
    | {
        "cluster",
        "data",
        "privacy",
        "release",
        "tracking",
        "central",
        "warmup",
        "diffusion",
        "distributed",
        "sample",
        "evaluate",
        "mlflow_model",
        "rundir",
        "runplan",
    },
    "tune": BASE | {"cluster", "data", "privacy", "release", "tracking", "pipeline", "evaluate", "rundir", "runplan"},
    "export": {"config", "images", "privacy", "release", "storage"},  # reads release/ only
    "audit_plot": set(),  # the audit's score histogram (Pillow)
    "canaries": {"config", "data", "dpsgd", "finetune"},  # gradient canaries in the DP-SGD step
    "audit": {
        "config",
        "checkpoint",
        "privacy",
        "data",
        "cluster",
        "distributed",
        "pipeline",
        "tracking",
        "canaries",
        "audit_plot",
    },  # dpfeta audit: plans like a run, never a release
    "cli": None,  # the entry point may import anything
    "__main__": {"cli"},
}
# third-party packages a part must never import (anywhere in its code)
FORBIDDEN = {
    "privacy": {"torch", "ray", "opacus", "mlflow"},
    "release": {"torch", "ray", "mlflow"},
    "storage": {"torch", "ray", "mlflow"},
    "export": {"torch", "ray", "mlflow"},
    "config": {"torch", "ray", "dp_accounting", "mlflow"},
    "dpsgd": {"ray", "mlflow"},
    "diffusion": {"ray", "mlflow", "opacus", "PIL", "yaml"},
    "augment": {"ray", "mlflow", "opacus", "PIL"},
}
# ... and at module level only (a function may import them lazily: `dpfeta budget` must not load torch)
FORBIDDEN_AT_IMPORT = {
    "data": {"torch", "torchvision", "ray"},
    "images": {"torch"},
    "cluster": {"torch", "ray"},
    "tune": {"ray", "torch"},
    "runplan": {"torch", "ray", "mlflow"},
    "rundir": {"torch", "ray", "mlflow"},
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dpfeta" and len(parts) > 1 else None


def _imports(path: Path):
    """(imported module, is it at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dpfeta":
                for alias in node.names:
                    yield f"dpfeta.{alias.name}", id(node) in top
            else:
                yield node.module, id(node) in top


MODULES = sorted(ROOT.rglob("*.py"))


def _owner(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def test_every_part_is_in_the_table():
    parts = {_owner(p) for p in MODULES} - {"__init__"}
    assert parts <= set(ALLOWED), sorted(parts - set(ALLOWED))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    owner = _owner(path)
    if owner == "__init__":
        return
    allowed = ALLOWED[owner]
    bad = []
    for module, at_top in _imports(path):
        target = _part(module)
        if target is not None and allowed is not None and target != owner and target not in allowed:
            bad.append(f"{module} (dpfeta.{owner} may import {sorted(allowed) or 'nothing of dpfeta'})")
        root = module.split(".")[0]
        if root in FORBIDDEN.get(owner, ()):
            bad.append(f"{module} (dpfeta.{owner} never imports {root})")
        if at_top and root in FORBIDDEN_AT_IMPORT.get(owner, ()):
            bad.append(f"{module} at module level (dpfeta.{owner} imports {root} lazily only)")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_table_has_no_cycle():
    graph = {k: v for k, v in ALLOWED.items() if v is not None}
    state: dict[str, int] = {}

    def visit(node, stack):
        if state.get(node) == 1:
            raise AssertionError(f"cycle in the layer table: {' -> '.join(stack + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, stack + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])

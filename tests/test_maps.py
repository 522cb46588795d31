"""The maps stay honest: every part of dpfeta (a top-level module or package, and each module of a
package) is on a floor of ``docs/architecture.md`` and in the README code map, in the spirit of
``test_layers.py``, which keeps the imports honest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "dpfeta"


def _parts() -> list[str]:
    """``config``, ``privacy/``, ... (``__init__`` is its package's)."""
    found = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    found |= {f"{p.name}/" for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    return sorted(found)


def _submodules() -> list[str]:
    """``privacy/ledger``, ``tune/trial``, ... (one level: dpfeta's packages are flat)."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in ROOT.glob("*/*.py") if p.stem != "__init__")


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end >= 0 else None]


FLOORS = _section((REPO / "docs" / "architecture.md").read_text(), "## Floors")
MODULES = _section((REPO / "docs" / "architecture.md").read_text(), "## Packages and modules")
CODE_MAP = _section((REPO / "README.md").read_text(), "## Code map")


@pytest.mark.parametrize("part", _parts())
def test_every_part_is_on_a_floor_and_in_the_code_map(part):
    assert f"`{part}`" in FLOORS, f"docs/architecture.md's floor table does not list `{part}`"
    assert f"`dpfeta/{part.removesuffix('/')}{'/' if part.endswith('/') else '.py'}`" in CODE_MAP, (
        f"README.md's code map does not list dpfeta/{part}"
    )


@pytest.mark.parametrize("module", _submodules())
def test_every_module_of_a_package_is_named(module):
    package, name = module.split("/")
    for where, text in (("README.md's code map", CODE_MAP), ("docs/architecture.md", MODULES)):
        rows = [line for line in text.splitlines() if f"`{package}/" in line or f"`dpfeta/{package}/`" in line]
        block = "\n".join(rows) if where.startswith("README") else _entry(text, package)
        assert re.search(rf"`{name}`", block), f"{where} does not name `{name}` of {package}/"


def _entry(text: str, package: str) -> str:
    """The bullet of ``package/`` in docs/architecture.md's list (up to the next bullet)."""
    start = text.index(f"- **`{package}/`**")
    end = text.find("\n- **", start + 1)
    return text[start : end if end >= 0 else None]

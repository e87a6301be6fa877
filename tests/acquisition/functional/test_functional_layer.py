"""The functional layer is pure: no Lightning anywhere in its code or in the package modules it imports, and
every public name is exported with a docstring."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import saal_lightning
from saal_lightning.acquisition import functional

PACKAGE_ROOT = Path(saal_lightning.__file__).parent.parent


def _module_file(name: str) -> Path | None:
    path = PACKAGE_ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_reached(start: str) -> tuple[set[str], set[str]]:
    """Package modules reached from ``start`` through its imports (not the parent packages' ``__init__``s), and
    the top-level names of every third-party import they make."""
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = _module_file(name)
        assert file is not None, name
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"relative import in {name}"
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "saal_lightning":
                    third_party.add(target.split(".")[0])
                elif _module_file(target) is not None:
                    todo.append(target)
    return seen, third_party


def test_no_lightning_in_the_functional_layer():
    modules, third_party = _imports_reached("saal_lightning.acquisition.functional")
    assert {"saal_lightning.acquisition.functional.head", "saal_lightning.acquisition.saal_score",
            "saal_lightning.acquisition.selection"} <= modules
    assert not any(name.startswith(("saal_lightning.callbacks", "saal_lightning.acquisition.strategies"))
                   for name in modules)
    assert "torch" in third_party
    assert not third_party & {"lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities"}, third_party


def test_every_export_is_documented():
    assert sorted(functional.__all__) == functional.__all__
    option_types = {"Method": ("auto", "hooks", "vmap", "first_order", "last_layer"), "Mode": ("max", "diff")}
    for name in functional.__all__:
        value = getattr(functional, name)
        if name in option_types:
            assert get_args(value) == option_types[name]
        else:
            assert value.__module__.startswith("saal_lightning.acquisition."), name
            assert value.__doc__ and len(value.__doc__.strip()) > 20, name

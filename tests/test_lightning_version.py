"""The suite runs against a Lightning release the package allows: pyproject caps it at the newest one CI tests.

A few pieces subclass Lightning's classes at documented but unstable seams (AppendingCSVLogger's writer, the
data module's ``val_dataloader`` that is absent without a validation set), so a new Lightning minor release must
be tested before the cap is raised.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


def test_installed_lightning_is_within_the_capped_range() -> None:
    # tomllib is Python >= 3.11 and the package supports 3.10: the one requirement line is read as text.
    (requirement,) = re.findall(r'"(lightning[<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text())
    specifier = SpecifierSet(requirement.removeprefix("lightning"))
    assert any(s.operator == "<" for s in specifier), f"{requirement!r} has no upper bound"
    assert version("lightning") in specifier, f"lightning {version('lightning')} is outside {requirement!r}"

import sys
from pathlib import Path

import pytest

# The repository root on the path, so that tests can import `tests.synthetic_data` and `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _no_pytest_arguments_in_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests drive the CLI through main(args); LightningCLI warns when sys.argv also carries pytest's arguments.
    monkeypatch.setattr(sys, "argv", sys.argv[:1])

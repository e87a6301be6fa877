import sys
from pathlib import Path

import pytest

# The repository root on the path, so that tests can import `tests.synthetic_data` and `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _no_pytest_arguments_in_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests drive the CLI through main(args); LightningCLI warns when sys.argv also carries pytest's arguments.
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture(autouse=True)
def _no_global_seed_from_an_earlier_test(monkeypatch: pytest.MonkeyPatch) -> None:
    # seed_everything records its seed in PL_GLOBAL_SEED, which unset data and acquisition seeds follow: every
    # test starts without one, and a seed a test sets ends with it.
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)

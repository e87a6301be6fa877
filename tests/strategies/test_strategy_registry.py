"""The registry: every strategy by name and by class_path, with its documented reference and example."""

from __future__ import annotations

import jsonargparse
import pytest

from saal_lightning.acquisition.strategies import (
    BADGE,
    LL4AL,
    SAAL,
    STRATEGIES,
    VAAL,
    AcquisitionStrategy,
    Coreset,
    Entropy,
    LeastConfidence,
    Margin,
    RandomSampling,
    SAALDiverse,
    build_strategy,
)

ISSUE_3_STRATEGIES = (Margin, LeastConfidence, Coreset, BADGE, SAALDiverse, LL4AL, VAAL)


def test_registry_names():
    registered = dict(STRATEGIES)
    assert registered == {
        "random": RandomSampling,
        "entropy": Entropy,
        "margin": Margin,
        "least_confidence": LeastConfidence,
        "coreset": Coreset,
        "badge": BADGE,
        "ll4al": LL4AL,
        "vaal": VAAL,
        "saal": SAAL,
        "saal_diverse": SAALDiverse,
    }


def test_build_strategy_by_name_with_options():
    strategy = build_strategy("saal_diverse", rho=0.1, space="gradient")
    assert isinstance(strategy, SAALDiverse) and strategy.rho == 0.1 and strategy.space == "gradient"
    with pytest.raises(ValueError, match="Unknown acquisition strategy 'kcenter'"):
        build_strategy("kcenter")
    with pytest.raises(ValueError, match="only apply to a strategy given by name"):
        build_strategy(BADGE(), seed=1)


@pytest.mark.parametrize("cls", list(STRATEGIES.values()), ids=list(STRATEGIES))
def test_every_strategy_builds_from_a_class_path(cls):
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=AcquisitionStrategy)
    config = parser.parse_object({"strategy": {"class_path": f"{cls.__module__}.{cls.__name__}"}})
    strategy = parser.instantiate(config).strategy
    assert type(strategy) is cls


def test_class_path_arguments_are_typed():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=AcquisitionStrategy)
    path = "saal_lightning.acquisition.strategies.LL4AL"
    config = parser.parse_object(
        {"strategy": {"class_path": path, "init_args": {"feature_layers": ["a", "b"], "optimizer": "sgd"}}}
    )
    training = parser.instantiate(config).strategy.training_callback()
    assert training.feature_layers == ["a", "b"] and training.optimizer_name == "sgd"
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_object({"strategy": {"class_path": path, "init_args": {"optimizer": "rmsprop"}}})


@pytest.mark.parametrize("cls", ISSUE_3_STRATEGIES, ids=lambda cls: cls.name)
def test_docstring_names_a_reference_and_an_example(cls):
    assert "Reference:" in cls.__doc__ and "Example::" in cls.__doc__

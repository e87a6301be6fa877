"""ActiveClassifier's options: closed sets as Literal, numbers checked with one message shape, public Lightning API."""

from __future__ import annotations

import inspect
import re
import typing

import pytest
import torch
from torch import nn

from saal_lightning.models import BACKBONES, classifier
from saal_lightning.models.classifier import ActiveClassifier, check_classifier_options
from saal_lightning.optim.sam import SAM


@pytest.mark.parametrize(("options", "message"), [
    ({"num_classes": 2.5}, "num_classes must be an integer >= 2, got 2.5"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
    ({"in_channels": True}, "in_channels must be an integer >= 1, got True"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of 'adam', 'sgd', 'sam', got 'rmsprop'"),
    ({"sam_base": "adamw"}, "sam_base must be one of 'sgd', 'adam', got 'adamw'"),
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"rho": -1.0}, "rho must be a finite number > 0, got -1.0"),  # refused with Adam too: a radius is positive
    ({"momentum": -0.1}, "momentum must be a finite number >= 0, got -0.1"),
    ({"weight_decay": "0.1"}, "weight_decay must be a finite number >= 0, got '0.1'"),
    ({"backbone": "smal_cnn"}, "backbone must be one of 'resnet18', 'small_cnn', 'wide_cnn' or an nn.Module, got "
                               "'smal_cnn' (did you mean 'small_cnn'?)"),
])
def test_an_invalid_option_is_refused_naming_it(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        ActiveClassifier(**({"backbone": "small_cnn"} | options))
    assert str(error.value) == message
    with pytest.raises(ValueError, match=message.split(",")[0]):
        check_classifier_options(options)  # what `saal` checks before it builds anything


def test_closed_sets_are_literals_and_match_the_registries() -> None:
    hints = typing.get_type_hints(ActiveClassifier.__init__)
    assert typing.get_args(hints["optimizer"]) == ("adam", "sgd", "sam")
    assert typing.get_args(hints["sam_base"]) == ("sgd", "adam")
    assert {"resnet18", "small_cnn", "wide_cnn"} <= set(BACKBONES)
    ActiveClassifier("wide_cnn", num_classes=10, in_channels=1, lr=1, momentum=0)  # integers are numbers


def test_sam_optimizer_is_built_without_a_trainer() -> None:
    # configure_optimizers reads the trainer's precision through the public `trainer` property when attached.
    model = ActiveClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), num_classes=2, optimizer="sam")
    assert isinstance(model.configure_optimizers(), SAM)
    assert model(torch.zeros(3, 4)).shape == (3, 2)


def test_the_classifier_uses_no_private_lightning_attribute() -> None:
    assert not re.search(r"\._trainer\b", inspect.getsource(classifier))

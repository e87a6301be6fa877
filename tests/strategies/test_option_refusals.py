"""Strategy and selection options: closed sets are Literal types checked at construction, integers are checked
with one message shape ("<name> must be an integer >= 1, got 2.5")."""

from __future__ import annotations

from typing import get_args, get_type_hints

import jsonargparse
import pytest
import torch

from saal_lightning.acquisition.functional import Method, Mode
from saal_lightning.acquisition.selection import k_center_greedy, kmeans_pp_seeding, top_k, uniform_random
from saal_lightning.acquisition.strategies import SAAL, AcquisitionStrategy, Coreset, SAALDiverse
from saal_lightning.acquisition.strategies.saal_diverse import Space


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Coreset(chunk_size=2.5), "chunk_size must be an integer >= 1, got 2.5"),
        (lambda: Coreset(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
        (lambda: Coreset(chunk_size=True), "chunk_size must be an integer >= 1, got True"),
        (lambda: SAAL(chunk_size=2.5), "chunk_size must be an integer >= 1 or None, got 2.5"),
        (lambda: SAALDiverse(chunk_size=0), "chunk_size must be an integer >= 1 or None, got 0"),
        (lambda: SAAL(mode="min"), "mode must be one of 'max', 'diff', got 'min'"),
        (lambda: SAAL(method="loop"),
         "method must be one of 'auto', 'hooks', 'vmap', 'first_order', 'last_layer', got 'loop'"),
        (lambda: SAALDiverse(space="embedding"), "space must be one of 'score', 'gradient', got 'embedding'"),
    ],
)
def test_construction_refuses_bad_options_with_one_message_shape(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("select", "message"),
    [
        (lambda: top_k(torch.zeros(5), 2.5), "query_size must be an integer >= 1, got 2.5"),
        (lambda: uniform_random(5, 0, torch.Generator()), "query_size must be an integer >= 1, got 0"),
        (lambda: kmeans_pp_seeding(torch.zeros(5, 1), 2.0, torch.Generator()),
         "query_size must be an integer >= 1, got 2.0"),
        (lambda: k_center_greedy(torch.zeros(5, 2), 2, chunk_size=1.5), "chunk_size must be an integer >= 1, got 1.5"),
        (lambda: top_k(torch.zeros(5), 6), "cannot select 6 items from a pool of 5"),
    ],
)
def test_selection_refuses_non_integer_counts(select, message):
    with pytest.raises(ValueError) as error:
        select()
    assert str(error.value) == message


def test_closed_sets_are_literal_types():
    assert get_args(Mode) == ("max", "diff")
    assert get_args(Method) == ("auto", "hooks", "vmap", "first_order", "last_layer")
    assert get_args(Space) == ("score", "gradient")
    hints = get_type_hints(SAALDiverse.__init__)
    assert (hints["mode"], hints["method"], hints["space"]) == (Mode, Method, Space)


def test_the_command_line_refuses_a_value_outside_a_literal_at_parse_time():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=AcquisitionStrategy)
    path = "saal_lightning.acquisition.strategies.SAALDiverse"
    config = parser.parse_object({"strategy": {"class_path": path, "init_args": {"space": "gradient", "mode": "diff"}}})
    strategy = parser.instantiate(config).strategy
    assert (strategy.space, strategy.mode) == ("gradient", "diff")
    for init_args in ({"space": "embedding"}, {"mode": "min"}, {"method": "loop"}):
        with pytest.raises(jsonargparse.ArgumentError):
            parser.parse_object({"strategy": {"class_path": path, "init_args": init_args}})

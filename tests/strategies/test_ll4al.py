"""LL4AL: the ranking loss, the loss-prediction module and the callback that trains it (hooks, restarts, DDP
averaging, state)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from saal_lightning.acquisition.strategies.ll4al import LL4AL
from saal_lightning.callbacks import LossPredictionTraining
from saal_lightning.models.backbones import resnet18, small_cnn
from saal_lightning.models.loss_prediction import LossPredictionModule, loss_ranking_loss

SINGLE_PROCESS = SimpleNamespace(world_size=1)


def train(training: LossPredictionTraining, model: nn.Module, batch, trainer=SINGLE_PROCESS) -> None:
    """One training batch of the classifier, as Lightning reports it to the callback."""
    training.on_train_batch_end(trainer, model, None, batch, 0)


def attached(training: LossPredictionTraining, reset_weights: bool = True) -> SimpleNamespace:
    """A stand-in for the AcquisitionCallback that ``training`` serves: its round and reset option."""
    acquisition = SimpleNamespace(current_round=0, reset_weights=reset_weights)
    training.attach(SimpleNamespace(callbacks=[acquisition]), acquisition)
    return acquisition


def no_hooks_left(model: nn.Module) -> bool:
    return not any(module._forward_hooks for module in model.modules())


def regression_model() -> nn.Sequential:
    """A fixed 2 -> 32 -> 2 classifier; with all targets 0 its per-item loss is a smooth function of x."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks_a, ranks_b = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])


def test_ranking_loss_numbers():
    predicted = torch.tensor([0.5, 2.0, 0.0, 1.0])
    target = torch.tensor([3.0, 1.0, 2.0, 0.0])
    # Pairs (0, 3): target 3 > 0, predicted gap -0.5 -> 1.5; (1, 2): target 1 < 2 -> sign -1, gap 2 -> 3.0.
    assert float(loss_ranking_loss(predicted, target)) == pytest.approx((1.5 + 3.0) / 2)
    assert float(loss_ranking_loss(predicted, target, margin=0.25)) == pytest.approx((0.75 + 2.25) / 2)
    # Odd batch: the middle item is left out, pairs (0, 4), (1, 3).
    odd = loss_ranking_loss(torch.tensor([2.0, 0.0, 9.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 5.0, 0.0, 0.0]))
    assert float(odd) == pytest.approx((0.0 + 1.0) / 2)


def test_ranking_loss_of_a_single_item_is_zero_but_differentiable():
    predicted = torch.tensor([1.5], requires_grad=True)
    loss = loss_ranking_loss(predicted, torch.tensor([2.0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and predicted.grad is not None


def test_loss_prediction_module_architecture():
    module = LossPredictionModule([3, 5], hidden_dim=7)
    assert [tuple(branch.weight.shape) for branch in module.branches] == [(7, 3), (7, 5)]
    assert tuple(module.out.weight.shape) == (1, 14)
    feature_map, vector = torch.randn(4, 3, 6, 6), torch.randn(4, 5)
    expected = module.out(
        torch.cat([F.relu(module.branches[0](feature_map.mean(dim=(2, 3)))), F.relu(module.branches[1](vector))], 1)
    ).squeeze(1)
    torch.testing.assert_close(module([feature_map, vector]), expected)


def test_training_learns_to_rank_the_losses():
    model = regression_model()
    strategy = LL4AL(feature_layers=["1"], hidden_dim=32, lr=3e-3, seed=0)
    training = strategy.training_callback()
    generator = torch.Generator().manual_seed(0)
    held_out = torch.randn(256, 2, generator=generator)
    true_loss = F.cross_entropy(model(held_out), torch.zeros(256, dtype=torch.long), reduction="none").detach()

    train(training, model, (held_out[:2], torch.zeros(2, dtype=torch.long)))
    before = strategy.compute(model, held_out)
    for _ in range(300):
        inputs = torch.randn(32, 2, generator=generator)
        train(training, model, (inputs, torch.zeros(32, dtype=torch.long)))
    after = strategy.compute(model, held_out)

    assert after.shape == (256,)
    assert float(loss_ranking_loss(after, true_loss)) < 0.5 * float(loss_ranking_loss(before, true_loss))
    assert spearman(after, true_loss) > 0.9


def test_training_leaves_the_model_and_global_rng_untouched():
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, in_channels=1).train()
    model.features[1].eval()  # a BatchNorm the user froze must stay frozen
    modes = [module.training for module in model.modules()]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    strategy = LL4AL(feature_layers=["features.2", "features.6"])
    batch = (torch.randn(8, 1, 28, 28), torch.randint(3, (8,)))
    rng = torch.get_rng_state()
    train(strategy.training_callback(), model, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [module.training for module in model.modules()] == modes
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert no_hooks_left(model)
    assert strategy.compute(model.eval(), batch[0]).shape == (8,)
    assert no_hooks_left(model)


def test_hooks_are_removed_when_the_forward_fails():
    class TupleStage(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    model = nn.Sequential(nn.Linear(2, 4), TupleStage())
    with pytest.raises(ValueError, match="expected a tensor"):
        train(LossPredictionTraining(feature_layers=["1"]), model, (torch.zeros(2, 2), torch.zeros(2)))
    assert no_hooks_left(model)


def test_default_layers_are_the_resnet_stages_even_when_wrapped():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = resnet18(num_classes=4, in_channels=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    wrapped = Wrapper()
    training = LL4AL().training_callback()
    assert list(training.feature_modules(wrapped).values()) == [
        wrapped.model.layer1,
        wrapped.model.layer2,
        wrapped.model.layer3,
        wrapped.model.layer4,
    ]
    train(training, wrapped, (torch.randn(2, 3, 32, 32), torch.tensor([0, 3])))
    assert [branch.in_features for branch in training.predictor.branches] == [64, 128, 256, 512]


def test_missing_layers_give_a_clear_error():
    # At fit start, before the first training batch.
    with pytest.raises(ValueError, match="pass feature_layers"):
        LossPredictionTraining().on_fit_start(None, small_cnn(num_classes=3, in_channels=1))
    with pytest.raises(ValueError, match=r"feature_layers \['nope'\] match no module"):
        LossPredictionTraining(feature_layers=["features.2", "nope"]).on_fit_start(None, small_cnn(3, 1))
    two_stages = nn.ModuleDict({"a": nn.ModuleDict({"layer1": nn.ReLU()}), "b": nn.ModuleDict({"layer1": nn.ReLU()})})
    with pytest.raises(ValueError, match="more than one"):
        LossPredictionTraining(feature_layers=["layer1"]).feature_modules(two_stages)


def test_compute_before_training_is_refused():
    with pytest.raises(RuntimeError, match="untrained"):
        LL4AL(feature_layers=["1"]).compute(regression_model(), torch.zeros(3, 2))


def test_gradients_are_averaged_across_ranks_before_the_step():
    calls = []

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        calls.append((tensor.shape, reduce_op))
        return torch.zeros_like(tensor)  # as if the other rank's gradient cancelled this one's

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    model = regression_model()
    training = LossPredictionTraining(feature_layers=["1"], hidden_dim=4, optimizer="sgd", lr=0.1, momentum=0.0)
    batch = (torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
    train(training, model, batch)
    before = [param.clone() for param in training.predictor.parameters()]
    train(training, model, batch, trainer)
    num_params = sum(param.numel() for param in training.predictor.parameters())
    assert calls == [(torch.Size([num_params]), "mean")]
    for param, old in zip(training.predictor.parameters(), before, strict=True):
        assert torch.equal(param, old)  # the step used the averaged (zero) gradient


def test_state_dict_round_trip_reproduces_scores_and_training():
    model = regression_model()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 2, generator=generator), torch.zeros(16, dtype=torch.long)) for _ in range(6)]
    strategy = LL4AL(feature_layers=["1"], hidden_dim=8)
    training = strategy.training_callback()
    for batch in batches[:5]:
        train(training, model, batch)
    buffer = io.BytesIO()
    torch.save(training.state_dict(), buffer)
    buffer.seek(0)
    restored = LL4AL(feature_layers=["1"], hidden_dim=8, seed=123)  # the seed must not matter after loading
    rng = torch.get_rng_state()
    restored.training_callback().load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(torch.get_rng_state(), rng)  # building the module on load drew no random numbers
    assert restored.training_callback().state_dict()["feature_dims"] == [32]

    probe = torch.randn(10, 2, generator=generator)
    torch.testing.assert_close(restored.compute(model, probe), strategy.compute(model, probe), rtol=0, atol=0)
    # The optimizer state came back too: one more identical step keeps them identical.
    for copy in (strategy, restored):
        train(copy.training_callback(), model, batches[5])
    torch.testing.assert_close(restored.compute(model, probe), strategy.compute(model, probe), rtol=0, atol=0)


def test_loaded_state_must_fit_the_model():
    trained = LossPredictionTraining(feature_layers=["1"], hidden_dim=8)
    train(trained, regression_model(), (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)))
    restored = LossPredictionTraining(feature_layers=["1"], hidden_dim=8)
    restored.load_state_dict(trained.state_dict())
    narrower = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"reads feature maps with \[32\] channels, the model gives \[5\]"):
        restored.predict(narrower, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[32\] channels, the model gives \[5\]"):
        train(restored, narrower, (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)))


def test_state_is_never_empty_so_that_a_checkpoint_without_it_is_refused():
    # Lightning leaves an empty state out of the checkpoint; a fresh callback's state says which round it is in.
    assert LossPredictionTraining().state_dict() == {"round": -1}
    checkpoint = {"callbacks": {"AcquisitionCallback": {}}}
    with pytest.raises(MisconfigurationException, match="holds no LossPredictionTraining state"):
        LossPredictionTraining().on_load_checkpoint(SimpleNamespace(ckpt_path="last.ckpt"), None, checkpoint)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_layers": []}, "non-empty list"),
        ({"hidden_dim": 0}, "hidden_dim must be an integer >= 1, got 0"),
        ({"hidden_dim": 2.5}, "hidden_dim must be an integer >= 1, got 2.5"),
        ({"margin": 0.0}, "margin"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of 'adam', 'sgd', got 'rmsprop'"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"seed": 0.5}, "seed must be an integer, got 0.5"),
    ],
)
def test_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LL4AL(**kwargs)


def test_a_new_round_from_the_initial_weights_restarts_the_loss_predictor_from_its_seeded_initialisation():
    model = regression_model()
    batch = (torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), torch.zeros(8, dtype=torch.long))
    fresh = LossPredictionTraining(feature_layers=["1"], seed=3)
    train(fresh, model, batch)
    trained = LossPredictionTraining(feature_layers=["1"], seed=3)
    acquisition = attached(trained)
    trained.on_train_epoch_start(SINGLE_PROCESS, model)
    for _ in range(5):
        train(trained, model, batch)
    trained.on_train_epoch_start(SINGLE_PROCESS, model)  # another epoch of the same round: nothing restarts
    assert not torch.equal(trained.predictor.out.weight, fresh.predictor.out.weight)
    acquisition.current_round = 1  # the acquisition callback recorded round 0 and restored the initial weights
    trained.on_train_epoch_start(SINGLE_PROCESS, model)
    assert trained.predictor is None and trained.state_dict() == {"round": 1}
    train(trained, model, batch)
    for ours, theirs in zip(trained.predictor.parameters(), fresh.predictor.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_warm_started_round_keeps_training_the_loss_predictor():
    model = regression_model()
    training = LossPredictionTraining(feature_layers=["1"])
    acquisition = attached(training, reset_weights=False)
    training.on_train_epoch_start(SINGLE_PROCESS, model)
    train(training, model, (torch.randn(8, 2), torch.zeros(8, dtype=torch.long)))
    predictor = training.predictor
    acquisition.current_round = 1
    training.on_train_epoch_start(SINGLE_PROCESS, model)
    assert training.predictor is predictor and training.state_dict()["round"] == 1


def test_the_callback_serves_an_acquisition_callback_only():
    with pytest.raises(MisconfigurationException, match="added to the trainer by the AcquisitionCallback"):
        LossPredictionTraining().on_train_epoch_start(SINGLE_PROCESS, regression_model())

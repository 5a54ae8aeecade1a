"""Smoke runs of the LLM, Bayesian-optimisation and reward-modelling examples in
tiny configurations (seconds each), in float32 as when run as scripts."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def float32():
    torch.set_default_dtype(torch.float32)  # conftest restores float64 afterwards


def test_huggingface_example(float32, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    example = load_example("huggingface_example")
    results = example.main(
        [
            "--n-train",
            "8",
            "--n-test",
            "4",
            "--seq-len",
            "4",
            "--epochs",
            "1",
            "--rank",
            "1",
        ]
    )
    assert set(results) == {"MAP", "last-layer LA", "LoRA LA"}
    for metrics in results.values():
        assert 0 <= metrics["acc"] <= 1 and math.isfinite(metrics["nll"])
    # rank 1 on c_attn (32 -> 96) in each of the 2 layers
    assert "posterior: 256" in capsys.readouterr().out


@pytest.mark.parametrize("acquisition", ["ei", "ucb"])
def test_bayesopt_example(float32, acquisition):
    example = load_example("bayesopt_example")
    results = example.main(
        [
            "--rounds",
            "1",
            "--n-init",
            "3",
            "--epochs",
            "5",
            "--starts",
            "2",
            "--steps",
            "2",
            "--acquisition",
            acquisition,
        ]
    )
    assert 0 <= results["best_x"] <= 1
    assert math.isfinite(results["regret"]) and results["regret"] >= -1e-4


def test_bayesopt_acquisition_is_differentiable(float32):
    """The acquisition's input gradient comes through the Laplace predictive."""
    example = load_example("bayesopt_example")
    torch.manual_seed(0)
    X = torch.rand(5, 1)
    la = example.fit_surrogate(X, example.objective(X), n_epochs=5)
    x = torch.rand(3, 1, requires_grad=True)
    value = example.acquisition(la, x, torch.tensor(0.0), "ei").sum()
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_reward_modeling_example(float32):
    example = load_example("reward_modeling_example")
    try:
        from laplace import Laplace

        Laplace(example.RewardModel(2), "reward_modeling", "all", "kron")
    except NotImplementedError as err:
        pytest.skip(f"likelihood='reward_modeling' is not supported yet: {err}")
    results = example.main(["--n-pairs", "20", "--dim", "2", "--epochs", "1"])
    assert all(math.isfinite(v) for v in results.values())
    assert results["std_in"] > 0 and results["std_out"] > 0

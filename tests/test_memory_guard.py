"""Sampling that cannot fit into memory fails up front, with the estimate and
how to split the call, before any allocation or random draw; the available
memory is monkeypatched to a small figure."""

import re
import sys

import pytest
import torch
from test_dtypes import build, fit, model_and_data

import laplace.utils.memory as memory
from laplace.utils.memory import InsufficientMemoryError, available_memory

pytestmark = pytest.mark.usefixtures("one_thread")


def fitted(likelihood, subset, structure):
    model, X, y = model_and_data(likelihood)
    return fit(build(model, likelihood, subset, structure), X, y), X


def limit(monkeypatch, n_bytes):
    monkeypatch.setattr(memory, "available_memory", lambda device: n_bytes)


@pytest.mark.parametrize(
    "subset,structure",
    [("all", "full"), ("all", "kron"), ("last_layer", "diag"), ("subnetwork", "full")],
)
def test_sample_refuses_what_cannot_fit(monkeypatch, subset, structure):
    la, _ = fitted("classification", subset, structure)
    width = la.sample(1).shape[1]
    # 10^6 float64 samples of `width` values, and as many for the chunks
    limit(monkeypatch, 10**6 * width * 8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(InsufficientMemoryError) as info:
        la.sample(10**6, generator=generator)
    message = str(info.value)
    assert "sample(n_samples=1000000) needs about" in message and "MiB" in message
    assert "chunks" in message and isinstance(info.value, MemoryError)
    assert torch.equal(generator.get_state(), state)  # nothing was drawn
    # the advertised chunk size passes (half the available memory)
    fits = int(re.search(r"at most about (\d+) samples", message).group(1))
    assert 10**5 < fits < 10**6
    assert la.sample(fits, generator=generator).shape == (fits, width)


@pytest.mark.parametrize(
    "subset,structure,pred_type",
    [
        ("all", "full", "glm"),
        ("all", "diag", "nn"),
        ("last_layer", "kron", "nn"),
        ("all", "gp", "gp"),
        ("ella", None, "gp"),
    ],
)
def test_function_samples_refuse_what_cannot_fit(
    monkeypatch, subset, structure, pred_type
):
    la, X = fitted("classification", subset, structure)
    limit(monkeypatch, 10**7)
    for method in (la.functional_samples, la.predictive_samples):
        with pytest.raises(InsufficientMemoryError, match="function samples"):
            method(X, pred_type=pred_type, n_samples=10**6)
    assert la.functional_samples(X, pred_type=pred_type, n_samples=10).shape == (
        10,
        len(X),
        3,
    )


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_nn_predictive_refuses_what_cannot_fit(monkeypatch, subset):
    la, X = fitted("regression", subset, "diag")
    # not even the outputs of one weight sample at a time fit
    limit(monkeypatch, 3 * len(X) * 2 * 8 - 1)
    with pytest.raises(InsufficientMemoryError, match="nn predictive") as info:
        la(X, pred_type="nn", link_approx="mc", n_samples=50)
    assert "chunks of fewer rows" in str(info.value)
    limit(monkeypatch, None)  # unknown: no check
    mean, var = la(X, pred_type="nn", link_approx="mc", n_samples=50)
    assert mean.shape == var.shape == (len(X), 2)


def test_available_memory_of_the_cpu(monkeypatch):
    with_psutil = available_memory(torch.device("cpu"))
    assert isinstance(with_psutil, int) and with_psutil > 0
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil fails
    from_meminfo = available_memory(torch.device("cpu"))
    if from_meminfo is not None:  # Linux: MemAvailable of /proc/meminfo
        assert abs(from_meminfo - with_psutil) < 0.25 * with_psutil
    assert available_memory(torch.device("meta")) is None


@pytest.mark.gpu
def test_available_memory_of_a_cuda_device():
    free, total = torch.cuda.mem_get_info()
    available = available_memory(torch.device("cuda"))
    assert free <= available <= total

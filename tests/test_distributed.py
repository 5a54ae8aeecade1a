"""Distributed fitting: two gloo ranks on CPU give the posterior of a single
process fitted on all data (float64).

The data set has an odd size, so ``DistributedSampler`` pads one rank with a
repeated sample; that repeat must not count. With ``drop_last=True`` the sampler
drops the tail instead, and the reference is the fit on the samples it draws.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from laplace import Laplace

WORLD = 2
N = 21
KEYS = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "kron"),
]


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (N,), generator=gen)
    return model, TensorDataset(X, y)


def summary(la):
    P = la.posterior_precision
    dense = P.to_matrix() if hasattr(P, "to_matrix") else P
    return {
        "precision": dense.detach().clone(),
        "loss": torch.as_tensor(la.loss).detach().clone(),
        "n_data": la.n_data,
        "marglik": la.log_marginal_likelihood().detach().clone(),
    }


def fit_all(dataset, loader_kw, continual):
    """{key: summary} of fits on ``dataset``; with ``continual`` a second fit
    with ``override=False`` on the same data follows."""
    model, _ = problem()
    out = {}
    for key in KEYS:
        la = Laplace(model, "classification", *key, prior_precision=0.5)
        la.fit(DataLoader(dataset, **loader_kw(dataset)))
        if continual:
            la.fit(DataLoader(dataset, **loader_kw(dataset)), override=False)
        out[key] = summary(la)
    return out


SCENARIOS = [(False, False), (True, False), (False, True)]  # (drop_last, continual)


def worker(rank, port, path):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _, dataset = problem()
        results = {}
        for drop_last, continual in SCENARIOS:

            def sharded(ds, drop_last=drop_last):
                sampler = DistributedSampler(
                    ds, WORLD, rank, shuffle=True, seed=3, drop_last=drop_last
                )
                return {"batch_size": 4, "sampler": sampler}

            results[drop_last, continual] = fit_all(dataset, sharded, continual)
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One spawn of two gloo ranks for all scenarios (start-up dominates)."""
    path = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), str(path)), nprocs=WORLD, join=True)
    return [
        torch.load(path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)
    ]


@pytest.mark.parametrize("drop_last,continual", SCENARIOS)
def test_two_ranks_equal_one_process(rank_results, drop_last, continual):
    _, dataset = problem()
    if drop_last:
        # the samples the two ranks drew: the sampler's shuffled order, cut to
        # an even count
        order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
        dataset = Subset(dataset, order[: (N // WORLD) * WORLD].tolist())
    reference = fit_all(dataset, lambda ds: {"batch_size": 5}, continual)
    for result in rank_results:
        for key in KEYS:
            got, want = result[drop_last, continual][key], reference[key]
            assert got["n_data"] == want["n_data"] == len(dataset) * (1 + continual)
            for name in ("precision", "loss", "marglik"):
                torch.testing.assert_close(
                    got[name], want[name], rtol=1e-10, atol=1e-12, msg=f"{key} {name}"
                )


def test_padding_is_counted_once_not_twice(rank_results):
    """Guard for the test itself: with the padded duplicate the loss differs."""
    _, dataset = problem()
    # DistributedSampler repeats the first index of its shuffled order
    first = int(torch.randperm(N, generator=torch.Generator().manual_seed(3))[0])
    padded = Subset(dataset, list(range(N)) + [first])
    reference = fit_all(padded, lambda ds: {"batch_size": 5}, False)
    key = KEYS[0]
    assert not torch.allclose(
        rank_results[0][False, False][key]["loss"], reference[key]["loss"]
    )

"""Fit a Laplace approximation with several processes (``torch.distributed``).

Run with::

    torchrun --nproc_per_node=2 examples/distributed_fit.py          # CPU, gloo
    torchrun --nproc_per_node=2 examples/distributed_fit.py --cuda   # GPUs, nccl

Every rank fits on its shard of the data (``DistributedSampler``); ``fit`` sums
the curvature over the ranks, so every rank holds the posterior of a fit on all
data. Rank 0 checks this against a single-process fit and prints the result.
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from laplace import Laplace


def make_problem(device: torch.device) -> tuple[nn.Module, TensorDataset]:
    """A small classifier and a synthetic data set, identical on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(1001, 10, generator=gen)  # odd size: the sampler pads a rank
    y = torch.randint(4, (1001,), generator=gen)
    return model, TensorDataset(X.to(device), y.to(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="nccl, one GPU per rank")
    parser.add_argument("--structure", default="kron", choices=["full", "kron", "diag"])
    args = parser.parse_args()

    if args.cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank = dist.get_rank()

    model, train_set = make_problem(device)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=64, sampler=sampler)
    la = Laplace(model, "classification", "all", args.structure)
    la.fit(loader)  # sums loss and curvature over all ranks
    la.optimize_prior_precision(method="marglik")  # local: every rank has it all

    if rank == 0:
        single = Laplace(model, "classification", "all", args.structure)
        single.fit(DataLoader(train_set, batch_size=64))
        single.optimize_prior_precision(method="marglik")
        ours, ref = la.log_marginal_likelihood(), single.log_marginal_likelihood()
        print(
            f"{dist.get_world_size()} ranks, n_data={la.n_data}: log marglik "
            f"{ours.item():.6f} (single process {ref.item():.6f}), prior precision "
            f"{la.prior_precision.item():.4f} ({single.prior_precision.item():.4f})"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

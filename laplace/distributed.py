"""Fitting across ``torch.distributed`` ranks.

``fit`` shards the data whenever a process group with more than one rank is
initialised and the loader draws its indices from a
:class:`~torch.utils.data.distributed.DistributedSampler`: every rank accumulates
curvature and loss on its shard, one ``all_reduce`` sums them, and every rank ends
with the posterior of a single-process fit on all the data.

``DistributedSampler`` pads the index list to a multiple of the world size by
repeating its first indices (``drop_last=False``); those repeats are dropped here,
so each sample counts once. With ``drop_last=True`` the sampler drops the tail
instead, and the data set is the ``num_samples * num_replicas`` samples drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from laplace.utils.data import batch_size, select_rows

__all__ = ["Shard", "data_shard", "all_reduce_sum", "all_reduce_max"]


@dataclass(frozen=True)
class Shard:
    """This rank's part of a data set sharded by a ``DistributedSampler``.

    Attributes
    ----------
    global_size : int
        Samples over all ranks, each counted once.
    local_size : int
        Samples of this rank without the sampler's padding.
    """

    global_size: int
    local_size: int

    def unpadded(
        self, batches: Iterable[tuple[Any, torch.Tensor]], dict_key_x: str
    ) -> Iterator[tuple[Any, torch.Tensor]]:
        """The first ``local_size`` samples of ``batches``: the padding sits at
        the end of every rank's index list."""
        left = self.local_size
        for X, y in batches:
            if left <= 0:
                return
            n = batch_size(X, dict_key_x)
            if n > left:
                X, y = select_rows(X, slice(0, left), n), y[:left]
                n = left
            left -= n
            yield X, y


def _sampler(loader: Iterable) -> Any:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    return getattr(getattr(loader, "batch_sampler", None), "sampler", None)


def data_shard(loader: Iterable, dataset_size: int) -> Shard | None:
    """The :class:`Shard` of ``loader`` on this rank, or ``None`` when the fit is
    not distributed (no process group, one rank, or no ``DistributedSampler``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    sampler = _sampler(loader)
    if world == 1 or not isinstance(sampler, DistributedSampler):
        return None
    if sampler.num_replicas != world or sampler.rank != dist.get_rank():
        raise ValueError(
            f"The DistributedSampler has num_replicas={sampler.num_replicas} and "
            f"rank={sampler.rank}, but the process group has world size {world} "
            f"and this is rank {dist.get_rank()}."
        )
    if sampler.drop_last:
        return Shard(sampler.num_samples * world, sampler.num_samples)
    # global position rank + j * world is a real sample iff it is < dataset_size
    return Shard(dataset_size, len(range(sampler.rank, dataset_size, world)))


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum every tensor over all ranks with a single ``all_reduce``; the tensors
    share one device and dtype."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return [p.view_as(t) for p, t in zip(parts, tensors)]


def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest ``value`` over all ranks."""
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

"""Aspect-ratio grouped, distributed, resumable batch sampling (the reference's
``DistributedGroupSampler``; torchvision's ``GroupedBatchSampler`` plays the same role)."""
from typing import Iterator, List, Sequence

import torch


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches whose images share an orientation (landscape: width / height > 1, else portrait),
    so that padding to the batch's largest image wastes little.

    Each group is shuffled with a generator seeded by (seed, epoch), padded by repeating its own
    images to a multiple of ``batch_size * world_size`` and cut into global batches; the global
    batches are shuffled and rank ``r`` takes the ``r``-th slice of each. Every rank thus gets the
    same number of full batches, and an epoch's order is a pure function of (seed, epoch), which
    lets a resumed run skip the batches it has already seen (``start_batch``).
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(aspect_ratios) == 0:
            raise ValueError("no images to sample from")
        self.groups: List[List[int]] = [[i for i, a in enumerate(aspect_ratios) if a > 1],
                                        [i for i, a in enumerate(aspect_ratios) if a <= 1]]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _global_batches(self) -> List[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        span = self.batch_size * self.world_size
        batches = []
        for group in self.groups:
            if not group:
                continue
            order = torch.randperm(len(group), generator=g).tolist() if self.shuffle else range(len(group))
            idx = [group[i] for i in order]
            pad = -len(idx) % span
            idx += (idx * (pad // len(idx) + 1))[:pad]
            batches += [idx[i:i + span] for i in range(0, len(idx), span)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self._global_batches()[self.start_batch:]:
            yield batch[lo:hi]

    def __len__(self) -> int:
        """Batches per epoch (a full epoch, whatever ``start_batch`` is)."""
        span = self.batch_size * self.world_size
        return sum(-(-len(g) // span) for g in self.groups if g)

"""An epoch-seeded, resumable, rank-aware sampler.

The order of epoch e depends only on (seed, e), so a resumed run can rebuild it and skip the
batches it already trained on; each rank takes every world_size-th index of that order.
"""

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed in this epoch

    # Not named set_epoch: Fabric's dataloader calls set_epoch(number of iter() calls) on any
    # sampler that has one, which would reset the resume position.
    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self):
        order = self._order()
        usable = len(order) - len(order) % self.world_size if self.world_size > 1 else len(order)
        return iter(order[self.rank : usable : self.world_size][self.start :])

    def __len__(self) -> int:
        return self.length // self.world_size - self.start if self.world_size > 1 else self.length - self.start

"""An epoch-seeded, resumable, rank-aware sampler.

The order of epoch e depends only on (seed, e), so a resumed run can rebuild it and skip the
batches it already trained on; each rank takes every world_size-th index of that order.
"""

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """``lengths`` (optional): group examples of similar length into the same batch, to cut
    padding. The shuffled order is cut into groups of ``group_size`` examples, each sorted by
    length, so batches stay random across groups but hold examples of similar length.
    ``mixture`` (a ``data.mixture.MixtureReport``): each epoch is the mixture's draw for that
    epoch (``length`` is ignored: an epoch holds the mixture's epoch size)."""

    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 lengths: list[int] | None = None, group_size: int = 0, mixture=None):  # fmt: skip
        self.mixture = mixture
        length = sum(mixture.counts) if mixture is not None else length
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.lengths, self.group_size = lengths, group_size
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed in this epoch

    # Not named set_epoch: Fabric's dataloader calls set_epoch(number of iter() calls) on any
    # sampler that has one, which would reset the resume position.
    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.mixture is not None:
            order = self.mixture.epoch_indices(self.seed, self.epoch, self.shuffle)
        elif not self.shuffle:
            order = list(range(self.length))
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        if self.lengths is not None and self.group_size > 1:
            groups = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [i for group in groups for i in sorted(group, key=lambda i: -self.lengths[i])]
        return order

    def __iter__(self):
        order = self._order()
        usable = len(order) - len(order) % self.world_size if self.world_size > 1 else len(order)
        return iter(order[self.rank : usable : self.world_size][self.start :])

    def __len__(self) -> int:
        return self.length // self.world_size - self.start if self.world_size > 1 else self.length - self.start

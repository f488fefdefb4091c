"""Deterministic, seeded, rank-sharded order of training blocks that resumes exactly from a position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataPosition:
    """Where the next micro-batch starts: epoch and micro-batch index inside that epoch."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> "DataPosition":
        return cls(epoch=int(data["epoch"]), index=int(data["index"]))


class ResumableBlockSampler:
    """Micro-batches of block indices for one rank.

    Each epoch shuffles all blocks with a generator seeded by ``seed + epoch``; the shuffled order is
    cut into global micro-batches of ``micro_batch_size * num_replicas`` blocks (the incomplete tail
    is dropped) and rank ``r`` takes the ``r``-th slice of each. The same global micro-batches are
    seen whatever the number of replicas, so losses compare across world sizes.
    """

    def __init__(self, num_blocks: int, micro_batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.num_blocks = num_blocks
        self.micro_batch_size = micro_batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.global_micro_batch = micro_batch_size * num_replicas
        if num_blocks < self.global_micro_batch:
            raise ValueError(
                f"{num_blocks} training blocks cannot fill one micro-batch of {self.global_micro_batch} "
                "(micro batch x processes); use more data, a smaller train.batch_size or a smaller data.seq_len"
            )
        self.position = DataPosition()
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.num_blocks // self.global_micro_batch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_blocks, generator=gen)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> torch.Tensor:
        """This rank's block indices for the next micro-batch; advances the position."""
        if self.position.index >= self.batches_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
        order = self._epoch_order(self.position.epoch)
        start = self.position.index * self.global_micro_batch + self.rank * self.micro_batch_size
        self.position = DataPosition(self.position.epoch, self.position.index + 1)
        return order[start : start + self.micro_batch_size]

    def state_dict(self) -> dict[str, int]:
        return self.position.to_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = DataPosition.from_dict(state)

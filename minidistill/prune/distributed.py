"""Calibration split over processes: each rank's share of the blocks and sums of statistics over ranks.

Under a multi-process launch every rank runs the calibration forward (and backward, for ``taylor``) on
the blocks ``rank::world``; the statistics it accumulates are sums over sequences or tokens (activation
score sums, Gram matrices, gradients, layer-similarity sums and counts), so summing them over ranks
gives the one-process result on all blocks, up to float64 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CalibrationShard:
    """This process's place among ``world`` processes; ``device``: where collectives run (the backend's device)."""

    rank: int = 0
    world: int = 1
    device: torch.device | str = "cpu"

    @classmethod
    def from_accelerator(cls, accelerator) -> "CalibrationShard":
        """The shard of ``accelerator``'s process (one process: the whole data, no collective)."""
        if accelerator is None or accelerator.num_processes == 1:
            return cls()
        return cls(rank=accelerator.process_index, world=accelerator.num_processes, device=accelerator.device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def blocks(self, calibration: Tensor) -> Tensor:
        """This rank's calibration blocks: rows ``rank::world``."""
        return calibration[self.rank :: self.world] if self.distributed else calibration

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over all ranks (a new tensor on ``tensor``'s device and dtype); every rank must call it."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        buffer = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(tensor.device)

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank (every rank must call it)."""
        if not self.distributed:
            return flag
        return int(self.sum(torch.tensor([int(flag)], dtype=torch.int64)).item()) == self.world


SINGLE = CalibrationShard()
"""One process holding all calibration blocks."""

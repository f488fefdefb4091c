"""Deterministic, seeded, rank-sharded order of training blocks that resumes exactly from a position."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..streaming import StreamCursor, TokenStream

STREAM_KEY = "stream_blocks"
CURSOR_KEY = "stream_cursor"


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
        if STREAM_KEY in state:
            raise ConfigError("the checkpoint was written by a data.streaming=true run; resume it with data.streaming=true")
        self.position = DataPosition.from_dict(state)


class StreamingBlockSampler:
    """Micro-batches of packed blocks from a :class:`~minidistill.streaming.TokenStream` for one rank.

    The position is the count of blocks taken and the stream cursor after the last block each rank took
    (gathered into the main process's checkpoint). Resuming continues the stream from this rank's cursor,
    so the batches after a resume are those of an uninterrupted run, and no consumed document is
    tokenized again. A checkpoint without cursors (written before they existed) is resumed by replaying
    the stream and skipping the blocks taken.
    With block sharding the global micro-batch of step ``k`` holds the stream's blocks
    ``[k * B * W, (k + 1) * B * W)`` for any number of processes ``W`` (``B`` blocks per process).
    """

    def __init__(self, stream: TokenStream, micro_batch_size: int, *, num_replicas: int = 1, rank: int = 0):
        self.stream = stream
        self.micro_batch_size = micro_batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.blocks_taken = 0
        self.cursor: StreamCursor | None = None
        """The stream cursor after the last block taken (None: none taken, or a replay is pending)."""
        self._replay = 0
        self._blocks = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(input_ids, position_ids)``, LongTensors [micro_batch_size, seq_len]; advances the position."""
        if self._blocks is None:
            self._blocks = self.stream.resumable_blocks(self.rank, self.num_replicas, self.cursor)
            for _ in itertools.islice(self._blocks, self._replay):
                pass
            self._replay = 0
        rows = list(itertools.islice(self._blocks, self.micro_batch_size))
        self.blocks_taken += len(rows)
        self.cursor = rows[-1][2]
        return torch.stack([ids for ids, _, _ in rows]), torch.stack([pos for _, pos, _ in rows])

    def state_dict(self) -> dict:
        state = {STREAM_KEY: self.blocks_taken, "num_replicas": self.num_replicas, "sharding": self.stream.sharding(self.num_replicas),
                 "files": [[str(p) for p in s.files] for s in self.stream.sources],
                 "shuffle_documents": self.stream.cfg.shuffle_documents}
        cursors = [None if self.cursor is None else self.cursor.to_dict()]
        if self.num_replicas > 1 and dist.is_available() and dist.is_initialized():  # every rank calls this (checkpoints are collective)
            cursors = [None] * self.num_replicas
            dist.all_gather_object(cursors, None if self.cursor is None else self.cursor.to_dict())
        if len(cursors) == self.num_replicas and any(c is not None for c in cursors):
            state[CURSOR_KEY] = cursors
        return state

    def load_state_dict(self, state: dict) -> None:
        if STREAM_KEY not in state:
            raise ConfigError("the checkpoint was written by a run without data.streaming; resume it with data.streaming=false")
        if int(state["num_replicas"]) != self.num_replicas:
            raise ConfigError(
                f"the checkpoint's stream position is for {state['num_replicas']} process(es) but this run has "
                f"{self.num_replicas}; resume a streaming run with the same number of processes"
            )
        files = [[str(p) for p in s.files] for s in self.stream.sources]
        if "files" in state and state["files"] != files:
            raise ConfigError(
                f"the checkpoint's stream read the files {state['files']}, this run reads {files}; resume with the "
                "same data.source / data.mix files (or start a new run)"
            )
        shuffled = int(state.get("shuffle_documents", 0))
        if shuffled != self.stream.cfg.shuffle_documents:
            raise ConfigError(
                f"the checkpoint's stream was shuffled in windows of data.shuffle_documents={shuffled}, this run sets "
                f"{self.stream.cfg.shuffle_documents}; resume with data.shuffle_documents={shuffled}"
            )
        self.blocks_taken = int(state[STREAM_KEY])
        cursors = state.get(CURSOR_KEY)
        if cursors is not None and len(cursors) == self.num_replicas and cursors[self.rank] is not None:
            self.cursor, self._replay = StreamCursor.from_dict(cursors[self.rank]), 0
        else:
            self.cursor, self._replay = None, self.blocks_taken
        self._blocks = None

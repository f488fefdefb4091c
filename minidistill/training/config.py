"""Training settings of a distillation run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from ..config import ConfigBase, ConfigError
from ..evaluation.lm_eval_runner import LmEvalConfig


@dataclass
class LoraSettings(ConfigBase):
    """Distill into LoRA adapters on the student (merged into the weights on save)."""

    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_parts: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"]
    )
    """Adapter layer-part names to adapt (parts a model type does not have are skipped)."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"train.lora.r={self.r}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.lora.dropout={self.dropout}: must be in [0, 1)")
        if not self.target_parts:
            raise ConfigError("train.lora.target_parts is empty: name at least one layer part, e.g. q_proj")


FrozenGroup = Literal["embeddings", "attention", "mlp", "norms"]


@dataclass
class TrainConfig(ConfigBase):
    """Optimisation, schedule, precision, checkpoints and logging of the distillation loop."""

    max_steps: int = 100
    """Optimizer steps to run (at most; see ``max_minutes``)."""
    max_minutes: float | None = None
    """Wall-clock budget of the training stage (steps, held-out evaluations, checkpoints). After
    ``time_probe_steps`` steps the run estimates how many steps fit, fits the learning-rate schedule to
    them, and ends with its final evaluation and checkpoint on time. None: ``max_steps`` alone."""
    time_probe_steps: int = 2
    """Steps timed before the step count for ``max_minutes`` is planned from their median (the first is not counted);
    until half of the planned steps are done, the run plans again every this many steps from the latest ones."""
    batch_size: int = 8
    """Sequences per optimizer step over all processes and accumulation steps."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (per-process micro batch = batch_size / (accum x processes))."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Decay after warmup: cosine, wsd (warmup-stable-decay) or constant."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    decay_fraction: float = 0.2
    """WSD: fraction of max_steps spent in the final linear decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping; the norm is still logged)."""
    mixed_precision: Literal["auto", "auto_bf16", "no", "bf16", "fp16"] = "auto"
    """Autocast precision. auto: bf16 on a GPU, fp32 on a CPU. auto_bf16: bf16 on a GPU and on a CPU with AMX
    bf16 matrix units (Intel Xeon 4th generation and later, where the demo's step runs 1.45x faster), fp32 on
    other CPUs (without AMX, bf16 matmuls have not been measured faster). Evaluation runs under the same autocast."""
    gradient_checkpointing: bool = False
    """Recompute student activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each student decoder layer."""
    seed: int = 0
    """Seed of the data order and of every random number generator."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted after a new one is complete)."""
    log_every: int = 1
    """Write a log record every N optimizer steps."""
    log_with: list[str] = field(default_factory=list)
    """Extra trackers through accelerate: tensorboard, wandb."""
    progress_bar: bool = True
    """tqdm bar with ETA on the main process."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all student weights (None: full training)."""
    freeze: list[FrozenGroup] = field(default_factory=list)
    """Student parameter groups kept at their initial (pruned) values: ``embeddings`` (the token embeddings and the
    output head, one tensor when tied), ``attention``, ``mlp``, ``norms``. A frozen group gets no gradient and no
    optimizer state (the backward skips its weight gradients). Empty: every student weight trains."""
    process_group_timeout_minutes: float = 120.0
    """Timeout of the process group's collectives and barriers in a multi-process run (torch's own default
    is 10 minutes under NCCL): long enough for a rank waiting at a barrier while another loads, prunes on
    CPU or saves a large model."""

    def validate(self) -> None:
        if self.freeze and self.lora is not None:
            raise ConfigError(f"train.freeze={self.freeze} with train.lora: LoRA already keeps every base weight frozen; "
                              "set train.freeze=[] or train.lora=null")
        if set(self.freeze) >= set(get_args(FrozenGroup)):
            raise ConfigError(f"train.freeze={self.freeze} freezes every student weight: leave at least one group to train")
        for key in ("max_steps", "batch_size", "grad_accum_steps", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be at least 1")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum_steps={self.grad_accum_steps}"
            )
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(f"train.max_minutes={self.max_minutes}: must be a positive number of minutes (or null)")
        if self.time_probe_steps < 2:
            raise ConfigError(f"train.time_probe_steps={self.time_probe_steps}: must be at least 2 (the first step is warm-up)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr={self.lr}: must be a positive finite number")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas}: need two values in [0, 1)")
        if self.warmup_steps < 0 or self.save_every < 0:
            raise ConfigError("train.warmup_steps and train.save_every must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction}: must be in (0, 1]")
        if self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm={self.max_grad_norm}: must be >= 0")
        timeout = self.process_group_timeout_minutes
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"train.process_group_timeout_minutes={timeout}: must be a positive number of minutes")
        unknown = [t for t in self.log_with if t not in ("tensorboard", "wandb")]
        if unknown:
            raise ConfigError(f"train.log_with: unknown tracker {unknown[0]!r}; choose tensorboard or wandb")

    def micro_batch_size(self, num_processes: int) -> int:
        """Sequences per process per micro-batch; ConfigError when batch_size does not split evenly."""
        per = self.grad_accum_steps * num_processes
        if self.batch_size % per:
            raise ConfigError(
                f"train.batch_size={self.batch_size} does not split into {self.grad_accum_steps} accumulation "
                f"steps x {num_processes} processes; make it a multiple of {per}"
            )
        return self.batch_size // per


@dataclass
class EvalConfig(ConfigBase):
    """Held-out evaluation during training, and lm-eval tasks after it."""

    every: int = 0
    """Evaluate every N optimizer steps (0: only at the start and the end)."""
    max_blocks: int | None = None
    """Held-out blocks evaluated (None: all of them)."""
    batch_size: int = 4
    """Held-out sequences per process per forward."""
    chunk_tokens: int = 2048
    """Token positions projected to the vocabulary at once."""
    lm_eval: LmEvalConfig | None = None
    """lm-eval tasks run on the teacher and the distilled student after training (None: skipped)."""

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every}: must be >= 0")
        if self.batch_size < 1 or self.chunk_tokens < 1:
            raise ConfigError("eval.batch_size and eval.chunk_tokens must be at least 1")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ConfigError(f"eval.max_blocks={self.max_blocks}: must be at least 1 (or null for all)")

"""Teacher correction (Minitron): fine-tune the teacher briefly on the distillation data before pruning.

An instruct teacher's distribution differs from the corpus it is pruned and distilled on; a short LM-loss
fine-tune on ``data.train`` blocks moves it there, so that importance and distillation see a teacher
that fits the data. LoRA adapters (peft) are trained by default and merged into the weights afterwards,
so the rest of the pipeline sees a plain model; ``method: full`` trains every weight instead.

In a recipe run the corrected teacher is saved to ``<run_dir>/teacher_corrected/`` (safetensors, with
``teacher_correction.json`` written last); a later run with the same correction settings and teacher
reloads it (checking its hash) instead of training again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .adapters import get_adapter
from .config import ConfigBase, ConfigError
from .evaluation.perplexity import heldout_loss
from .models import state_dict_sha256
from .prune.importance import lm_loss_backward

logger = logging.getLogger(__name__)

CORRECTED_DIR = "teacher_corrected"
RECORD_FILE = "teacher_correction.json"
_LAYER_PARTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


@dataclass
class TeacherCorrectionConfig(ConfigBase):
    """A short LM-loss fine-tune of the teacher on ``data.train`` blocks, before importance and distillation."""

    enabled: bool = True
    """Run the correction (a ``teacher_correction:`` section is on unless this is false)."""
    steps: int = 32
    """Optimizer steps."""
    batch_size: int = 4
    """Training blocks per step (drawn without replacement, reshuffled when exhausted)."""
    lr: float = 2e-4
    """Constant AdamW learning rate (LoRA: ~1e-4 to 5e-4; full: ~1e-5)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: no clipping)."""
    method: Literal["lora", "full"] = "lora"
    """``lora``: train LoRA adapters (peft) and merge them into the weights; ``full``: train every weight."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA adapter input."""
    target_modules: list[str] | None = None
    """Module names (last dotted part, e.g. ``q_proj``) that get adapters; None: every projection of the decoder layers."""
    chunk_tokens: int = 2048
    """Token positions projected to the vocabulary at once in the loss."""
    eval_blocks: int = 8
    """Held-out blocks on which the recipe stage measures the teacher's loss before and after (0: not measured)."""
    seed: int = 0
    """Seed of the block order, adapter initialisation and dropout."""

    def validate(self) -> None:
        for key in ("steps", "batch_size", "lora_r", "chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"teacher_correction.{key}={getattr(self, key)}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"teacher_correction.lr={self.lr}: must be a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"teacher_correction.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.eval_blocks < 0:
            raise ConfigError(f"teacher_correction.eval_blocks={self.eval_blocks}: must be >= 0")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("teacher_correction.max_grad_norm and teacher_correction.weight_decay must be >= 0")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("teacher_correction.target_modules is empty: name at least one module (e.g. q_proj) or null for all")


@dataclass
class CorrectionResult:
    """What a correction did."""

    losses: list[float]
    """Mean training LM loss of each step (before its update)."""
    seconds: float
    """Wall time of the training (and merge)."""
    method: str
    """``lora`` or ``full``."""
    target_modules: list[str]
    """Modules that got adapters (empty for ``full``)."""
    trainable_params: int
    """Parameters the optimizer updated."""


# ---------------------------------------------------------------------------------------------- LoRA


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted distinct last-part names of the model's ``nn.Linear`` modules (what LoRA can target)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def resolve_target_modules(model: nn.Module, cfg: TeacherCorrectionConfig) -> list[str]:
    """The LoRA target module names; ConfigError naming the modules the model has when one is missing."""
    have = linear_module_names(model)
    if cfg.target_modules is None:
        adapter = get_adapter(model)
        parts = {getattr(adapter, p).rsplit(".", 1)[-1] for p in _LAYER_PARTS if getattr(adapter, p, None)}
        return sorted(parts & set(have))
    missing = [m for m in cfg.target_modules if m not in have]
    if missing:
        raise ConfigError(
            f"teacher_correction.target_modules: {', '.join(repr(m) for m in missing)} "
            f"{'is not a module' if len(missing) == 1 else 'are not modules'} of this {model.config.model_type} "
            f"model; its linear modules are: {', '.join(have)} (or set teacher_correction.target_modules=null for "
            "every decoder projection)"
        )
    return sorted(set(cfg.target_modules))


def add_lora(model: nn.Module, cfg: TeacherCorrectionConfig):
    """Wrap ``model`` with trainable LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_target_modules(model, cfg)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    return get_peft_model(model, lora)


def merge_lora(peft_model) -> nn.Module:
    """Merge the adapters into the base weights; returns the plain base model (no peft modules left)."""
    return peft_model.merge_and_unload()


# ---------------------------------------------------------------------------------------------- training


def train_lm(model: nn.Module, blocks: torch.Tensor, cfg: TeacherCorrectionConfig) -> list[float]:
    """``cfg.steps`` AdamW steps of the mean next-token loss on ``blocks`` [N, T]; only parameters with
    ``requires_grad`` train. Returns the loss of each step. Vocabulary logits exist ``chunk_tokens`` rows at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses = []
    was_training = model.training
    model.train()
    try:
        for _ in range(cfg.steps):
            idx = []
            while len(idx) < min(cfg.batch_size, blocks.shape[0]):
                if not order:
                    order = torch.randperm(blocks.shape[0], generator=gen).tolist()
                idx.append(order.pop())
            ids = blocks[idx].to(device)
            count = ids[:, 1:].numel()
            total = lm_loss_backward(model, ids, cfg.chunk_tokens)
            for p in params:
                if p.grad is not None:
                    p.grad.div_(count)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / count)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"teacher correction: the loss is {losses[-1]} at step {len(losses)}; lower teacher_correction.lr")
    finally:
        model.train(was_training)
    return losses


def correct_teacher(model: nn.Module, blocks: torch.Tensor, cfg: TeacherCorrectionConfig) -> tuple[nn.Module, CorrectionResult]:
    """Fine-tune ``model`` on ``blocks`` (LoRA merged afterwards, or full); returns the plain corrected model.

    The model is changed in place (the returned model is the same object for both methods) and left in
    eval mode with its ``requires_grad`` flags as they were. Bad LoRA targets fail before any training.
    """
    cfg.validate()
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError("teacher correction needs training blocks of at least 2 tokens (data.train is empty)")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    try:
        if cfg.method == "lora":
            targets = resolve_target_modules(model, cfg)
            peft_model = add_lora(model, cfg)
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            losses = train_lm(peft_model.get_base_model(), blocks, cfg)
            corrected = merge_lora(peft_model)
        else:
            targets = []
            for p in model.parameters():
                p.requires_grad_(True)
            trainable = sum(p.numel() for p in model.parameters())
            torch.manual_seed(cfg.seed)
            losses = train_lm(model, blocks, cfg)
            corrected = model
    finally:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
            p.grad = None
    corrected.eval()
    result = CorrectionResult(losses=losses, seconds=time.perf_counter() - t0, method=cfg.method,
                              target_modules=targets, trainable_params=trainable)
    logger.info("teacher correction (%s, %d steps): training loss %.4f -> %.4f in %.1f s", cfg.method, cfg.steps,
                losses[0], losses[-1], result.seconds)
    return corrected, result


# ---------------------------------------------------------------------------------------------- recipe stage


def _record_matches(record: dict[str, Any], cfg: TeacherCorrectionConfig, teacher_source: str, data_config: dict) -> bool:
    return (record.get("config") == cfg.to_dict() and record.get("teacher_source") == teacher_source
            and record.get("data") == data_config)


def load_corrected(folder: Path, teacher: nn.Module) -> bool:
    """Load the corrected weights saved in ``folder`` into ``teacher`` in place; verify their recorded hash."""
    from safetensors.torch import load_model

    record = json.loads((folder / RECORD_FILE).read_text())
    load_model(teacher, str(folder / "model.safetensors"), strict=True)
    got = state_dict_sha256(teacher)
    if got != record["sha256"]:
        raise ValueError(f"{folder}: the loaded weights do not match the recorded sha256 (the folder was changed); delete it to redo the correction")
    return True


def save_corrected(folder: Path, teacher: nn.Module, tokenizer, record: dict[str, Any]) -> None:
    """Weights (safetensors), config and tokenizer, then ``teacher_correction.json`` last (the completion mark)."""
    from safetensors.torch import save_model

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_model(teacher, str(folder / "model.safetensors"))
    teacher.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def run_teacher_correction(cfg: TeacherCorrectionConfig, teacher: nn.Module, tokenizer, data, run_dir: str | Path, *,
                           teacher_source: str, accelerator=None) -> dict[str, Any]:
    """The recipe stage: correct ``teacher`` in place, or reload the run's saved correction; returns its record.

    The main process trains (bad LoRA targets fail first, on every process) and saves to
    ``<run_dir>/teacher_corrected/``; the other processes then load the saved weights.
    """
    folder = Path(run_dir) / CORRECTED_DIR
    if cfg.method == "lora":
        resolve_target_modules(teacher, cfg)  # a clear ConfigError before any training
    data_config = {k: v for k, v in data.config.to_dict().items() if k != "num_proc"}  # what decides the blocks
    marker = folder / RECORD_FILE
    if marker.is_file() and _record_matches(json.loads(marker.read_text()), cfg, teacher_source, data_config):
        load_corrected(folder, teacher)
        logger.info("teacher correction: reloaded the corrected teacher from %s", folder)
        return json.loads(marker.read_text())
    main = accelerator is None or accelerator.is_main_process
    if main:
        home = next(teacher.parameters()).device
        if accelerator is not None:
            teacher.to(accelerator.device)
        heldout = list(data.heldout.batches(4, cfg.eval_blocks)) if cfg.eval_blocks and len(data.heldout) else []
        before = heldout_loss(teacher, heldout)["loss"] if heldout else None
        teacher, result = correct_teacher(teacher, data.train.input_ids, cfg)
        after = heldout_loss(teacher, heldout)["loss"] if heldout else None
        teacher.to(home)
        record = {"config": cfg.to_dict(), "teacher_source": teacher_source, "data": data_config,
                  "sha256": state_dict_sha256(teacher), "losses": [round(v, 6) for v in result.losses],
                  "seconds": round(result.seconds, 2), "target_modules": result.target_modules,
                  "trainable_params": result.trainable_params,
                  "heldout_loss_before": before, "heldout_loss_after": after}
        save_corrected(folder, teacher, tokenizer, record)
        logger.info("teacher correction: held-out loss %s -> %s; saved to %s", before, after, folder)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            load_corrected(folder, teacher)
    return json.loads(marker.read_text())


__all__ = [
    "CORRECTED_DIR",
    "CorrectionResult",
    "TeacherCorrectionConfig",
    "add_lora",
    "correct_teacher",
    "linear_module_names",
    "load_corrected",
    "merge_lora",
    "resolve_target_modules",
    "run_teacher_correction",
    "train_lm",
]

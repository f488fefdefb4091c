"""The distillation loop on accelerate: one forward of each model per micro-batch, exact checkpoints.

The frozen teacher runs under ``torch.no_grad()``; the student and the objective's learnable parts run
inside :class:`DistillationModule`, the one module accelerate prepares (single process, DDP, FSDP2,
DeepSpeed). Data order comes from :class:`ResumableBlockSampler`; every process builds the same global
micro-batch and keeps its own rows (:func:`minidistill.training.placement.local_rows`). With ``data.streaming``,
:class:`StreamingBlockSampler` gives each process its own blocks of the stream, and their position ids reach
both models' forwards (:func:`minidistill.streaming.packed_positions`). With ``on_policy``, a share of the
micro-batches are the student's continuations of the blocks' prefixes (:mod:`minidistill.distill.on_policy`).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method

from ..adapters import get_adapter
from ..config import ConfigError
from ..data import TextData
from ..distill.objective import (
    CachedTeacher,
    DistillationModule,
    DistillLossConfig,
    DistillObjective,
    EnsembleTeacher,
    ModelFeatures,
    check_cache_compatible,
    feature_terms,
    teacher_features,
)
from ..distill.exits import ExitConfig, ExitHeads, check_exits
from ..distill.mutual import MutualConfig, MutualLoss, check_mutual, peer_name
from ..distill.netaug import AugmentedWidth, NetAugConfig, check_netaug, check_netaug_combination
from ..distill.on_policy import (
    OnPolicyConfig,
    check_on_policy,
    generated_mask,
    is_on_policy,
    sampling_uniforms,
)
from ..distill.teacher_cache import TeacherCacheError
from ..errors import MinidistillError
from ..prune.prune_map import PruneMap
from ..streaming import packed_positions
from . import placement
from .placement import distributed_kind, freeze, local_rows
from .checkpoint import clean_partial_checkpoints, load_checkpoint, save_checkpoint
from .config import EvalConfig, TrainConfig
from .evaluation import heldout_stats, summarize
from .run_log import RunLog, memory_mb, truncate_log
from .sampler import ResumableBlockSampler, StreamingBlockSampler
from .schedule import build_scheduler, schedule_of
from .time_budget import TimeBudget

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


class NonFiniteLossError(MinidistillError, RuntimeError):
    """A loss component became NaN or infinite; training stopped without saving."""


@dataclass
class TrainResult:
    """What a finished distillation produced."""

    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    final_eval: dict[str, float]
    teacher_eval: dict[str, float] | None
    last_checkpoint: Path | None
    module: DistillationModule = field(repr=False)
    accelerator: Any = field(repr=False)
    planned_steps: int | None = None
    """Steps the run planned (``train.max_steps``, or fewer under ``train.max_minutes``)."""
    stopped_by: str = "max_steps"
    """``max_steps`` (the plan ran to its end) or ``max_minutes`` (the time guard stopped it early)."""


def build_accelerator(train: TrainConfig, run_dir: Path):
    """An Accelerator for ``train``: gradient accumulation, precision (auto: bf16 on GPU), trackers, and the
    process-group timeout ``train.process_group_timeout_minutes``."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    precision = resolve_precision(train.mixed_precision)
    log_with = [t for t in train.log_with if t != "wandb" or _wandb_installed()]
    return Accelerator(
        gradient_accumulation_steps=train.grad_accum_steps,
        mixed_precision=precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=train.process_group_timeout_minutes))],
    )


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles, so that oneDNN runs bf16 matmuls natively."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # older torch, or a build without the check
        return False


def resolve_precision(choice: str) -> str:
    """Accelerate's ``mixed_precision`` for ``train.mixed_precision`` on this machine (``auto`` and ``auto_bf16``
    resolved; see :class:`TrainConfig`)."""
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if choice == "auto_bf16":
        return "bf16" if torch.cuda.is_available() or cpu_has_amx_bf16() else "no"
    return choice


def _wandb_installed() -> bool:
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        logger.warning("train.log_with lists wandb but it is not installed; skipping it")
        return False
    return True


def _apply_lora(student: nn.Module, train: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """Wrap ``student`` with LoRA adapters; returns (peft model, its base model with the adapters inside)."""
    from peft import LoraConfig, get_peft_model

    adapter = get_adapter(student)
    targets = sorted({getattr(adapter, part).rsplit(".", 1)[-1] for part in train.lora.target_parts if getattr(adapter, part, None)})
    if not targets:
        raise ValueError(f"train.lora.target_parts={train.lora.target_parts} names no layer part of this model type")
    cfg = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(student, cfg)
    return peft_model, peft_model.get_base_model()


class Distiller:
    """Runs one distillation: build, (resume,) train, evaluate, checkpoint. See :meth:`run`."""

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        data: TextData,
        prune_map: PruneMap | None,
        loss: DistillLossConfig,
        train: TrainConfig,
        eval: EvalConfig,
        run_dir: str | Path,
        config_dict: dict[str, Any],
        accelerator=None,
        run_name: str = "distill",
        vocab_size: int | None = None,
        teacher_cache=None,
        on_policy: OnPolicyConfig | None = None,
        mutual: MutualConfig | None = None,
        peers: list[nn.Module] | None = None,
        peer_prune_maps: list[PruneMap | None] | None = None,
        exits: ExitConfig | None = None,
        netaug: NetAugConfig | None = None,
        roles: dict[str, nn.Module] | None = None,
        trained_roles: dict[str, nn.Module] | None = None,
    ):
        self.train_cfg, self.eval_cfg, self.loss_cfg = train, eval, loss
        roles, trained_roles = dict(roles or {}), dict(trained_roles or {})
        if (roles or trained_roles) and (mutual is not None or exits is not None or netaug is not None or on_policy is not None
                                         or teacher_cache is not None or train.lora is not None or peers):
            raise ValueError("further roles are trained by the objective's terms alone: no mutual, exits, netaug, "
                             "on_policy, teacher_cache or LoRA")
        self.peer_names = list(trained_roles)
        """Names of the further trained roles (they are the module's peers; empty for mutual learning's peers)."""
        if trained_roles:
            peers = list(trained_roles.values())
        self.mutual = mutual
        """Deep mutual learning settings (None: the student alone); ``peers`` are then the other students."""
        peers = list(peers or [])
        peer_prune_maps = list(peer_prune_maps or [None] * len(peers))
        if (mutual is None and not trained_roles) != (not peers) or len(peer_prune_maps) != len(peers):
            raise ValueError("mutual and peers go together (one prune map or None per peer)")
        if mutual is not None:
            check_mutual(lora=train.lora is not None, on_policy=on_policy is not None, teacher_cache=teacher_cache is not None)
        if exits is not None:
            check_exits(lora=train.lora is not None, on_policy=on_policy is not None, mutual=mutual is not None)
        if netaug is not None:
            check_netaug_combination({"train.lora": train.lora is not None, "mutual": mutual is not None,
                                      "exits": exits is not None, "on_policy": on_policy is not None,
                                      "train.gradient_checkpointing": train.gradient_checkpointing,
                                      "train.compile": train.compile, "teacher_cache": teacher_cache is not None})
            check_netaug(prune_map, "the student")
        self.on_policy = on_policy
        """On-policy distillation settings (None: every micro-batch is corpus data)."""
        if on_policy is not None:
            check_on_policy(on_policy, loss, seq_len=int(data.train.input_ids.shape[1]), streaming=data.stream is not None,
                            teacher_cache=teacher_cache is not None)
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict
        self.data = data
        self.prune_map = prune_map
        self.accelerator = accelerator or build_accelerator(train, self.run_dir)
        acc = self.accelerator
        from accelerate.utils import set_seed

        set_seed(train.seed)
        self.micro_batch = train.micro_batch_size(acc.num_processes)
        if data.stream is not None:  # data.streaming: each process reads its own share of the stream
            if teacher_cache is not None:
                raise TeacherCacheError("teacher_cache reads data.train by block index; with data.streaming=true set teacher_cache=null")
            self.sampler = StreamingBlockSampler(data.stream, self.micro_batch, num_replicas=acc.num_processes, rank=acc.process_index)
        else:
            self.sampler = ResumableBlockSampler(len(data.train), self.micro_batch * acc.num_processes, seed=train.seed)

        self.teacher_cache = teacher_cache
        """A :class:`~minidistill.distill.teacher_cache.TeacherCache` of ``data.train``: the logit term reads the
        teacher from it and no teacher forward runs for training steps (None: a teacher forward per micro-batch)."""
        if teacher_cache is not None:
            check_cache_compatible(loss)
            m = teacher_cache.manifest
            if (m["num_blocks"], m["seq_len"]) != tuple(data.train.input_ids.shape):
                raise TeacherCacheError(
                    f"the teacher cache holds {m['num_blocks']} blocks of {m['seq_len']} tokens but data.train has "
                    f"{tuple(data.train.input_ids.shape)}: it was built for other data; set teacher_cache.path to a new folder"
                )
        if isinstance(teacher, EnsembleTeacher):
            features, key = feature_terms(loss)
            if features:
                raise ConfigError(f"an ensemble teacher gives the logit term its mean distribution only; set {key}=0")
            if _teacher_sharded(acc):
                raise ConfigError("an ensemble teacher runs as a replica; launch with launch/ddp.yaml or launch/zero2.yaml")
        self.peft_model = None
        if train.lora is not None and _teacher_sharded(acc):
            raise ValueError(
                "train.lora is supported on a single process, DDP and ZeRO-0/1/2; under FSDP2 and ZeRO-3 train all "
                "weights (train.lora=null) or launch with launch/ddp.yaml / launch/zero2.yaml"
            )
        if train.lora is not None:
            self.peft_model, student = _apply_lora(student, train)
        for model in (student, *peers):
            _ready_for_training(model, train)
            freeze_groups(model, train.freeze)
        for frozen in (teacher, *roles.values()):
            freeze(frozen)
        objective = DistillObjective(loss, teacher=teacher, student=student, prune_map=prune_map, vocab_size=vocab_size,
                                     roles=roles, trained_roles=trained_roles)
        self.student = student
        if trained_roles:
            module = DistillationModule(student, objective, peers=peers, peer_names=self.peer_names)
        elif mutual is None:
            module = DistillationModule(
                student, objective, exits=ExitHeads(student, exits, vocab_size) if exits is not None else None,
                netaug=AugmentedWidth(student, teacher, prune_map, netaug) if netaug is not None else None,
            )
        else:
            module = DistillationModule(
                student, objective, peers=peers,
                peer_objectives=[DistillObjective(loss, teacher=teacher, student=p, prune_map=m, vocab_size=vocab_size)
                                 for p, m in zip(peers, peer_prune_maps)],
                mutual=MutualLoss(mutual, vocab_size), mutual_weight=mutual.weight, teacher_weight=mutual.teacher_weight,
            )
        self.peers = peers
        params = [p for p in module.parameters() if p.requires_grad]
        # The fused AdamW kernel: on a GPU, and on a CPU with plain (unsharded) parameters, where it steps ~4x faster
        # than the per-tensor loop torch uses by default there.
        fused = {"fused": True} if acc.device.type == "cuda" or distributed_kind(acc) in ("single", "ddp") else {}
        optimizer = torch.optim.AdamW(
            params, lr=train.lr, betas=tuple(train.betas), eps=train.adam_eps, weight_decay=train.weight_decay, **fused
        )
        scheduler = build_scheduler(
            optimizer,
            max_steps=train.max_steps,
            warmup_steps=train.warmup_steps,
            kind=train.schedule,
            min_lr_ratio=train.min_lr_ratio,
            decay_fraction=train.decay_fraction,
        )
        self.module, self.optimizer, self.scheduler = self._prepare(module, optimizer, scheduler)
        if distributed_kind(acc) == "fsdp2":  # methods besides forward that run the trained models: the root's shards gathered
            register_fsdp_forward_method(acc.unwrap_model(self.module), "heldout")
            if on_policy is not None:
                register_fsdp_forward_method(acc.unwrap_model(self.module), "generate_student")
        self.teacher = self._prepare_teacher(teacher)
        self.roles = {name: self._prepare_teacher(model) for name, model in roles.items()}
        """Further frozen models by role name (placed like the teacher), for the objective's terms that target them."""
        self.teacher_sharded = _teacher_sharded(acc)
        self.run_name = run_name
        self.planned_steps, self._horizon_planned = train.max_steps, False
        self.clock = time.perf_counter
        """Seconds since an arbitrary origin; replaceable (tests drive the time budget with a fake clock)."""

    # ------------------------------------------------------------------ placement
    def _prepare(self, module, optimizer, scheduler):
        acc = self.accelerator
        return placement.prepare_student(
            acc, module, optimizer, scheduler, micro_batch_size=self.micro_batch, max_grad_norm=self.train_cfg.max_grad_norm
        )

    def _prepare_teacher(self, teacher):
        return placement.prepare_teacher(self.accelerator, teacher)

    # ------------------------------------------------------------------ pieces of a step
    def _global_rows(self, indices: torch.Tensor) -> torch.Tensor:
        return local_rows(self.accelerator, self.data.train.input_ids[indices]).to(self.accelerator.device)

    def _teacher_features(self, input_ids: torch.Tensor):
        with self.accelerator.autocast():
            return teacher_features(self.teacher, input_ids, self._objective(), copy_head=self.teacher_sharded)

    def _role_features(self, input_ids: torch.Tensor) -> dict[str, ModelFeatures]:
        """The further frozen roles' features for one micro-batch (one forward of each)."""
        with self.accelerator.autocast():
            return {name: teacher_features(model, input_ids, self._objective(), copy_head=self.teacher_sharded, role=name)
                    for name, model in self.roles.items()}

    def _cached_teacher(self, indices: torch.Tensor) -> CachedTeacher:
        rows = (local_rows(self.accelerator, t).to(self.accelerator.device) for t in self.teacher_cache.rows(indices))
        return CachedTeacher(*rows)

    def _on_policy_rows(self, indices: torch.Tensor, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global micro-batch ``indices`` with their last ``max_new_tokens`` tokens
        sampled by the student, and the mask of the generated positions."""
        acc, cfg = self.accelerator, self.on_policy
        blocks = self.data.train.input_ids[indices]
        prefix_len = blocks.shape[1] - cfg.max_new_tokens
        uniforms = sampling_uniforms(self.train_cfg.seed, micro_index, blocks.shape[0], cfg.max_new_tokens)
        prefix = local_rows(acc, blocks[:, :prefix_len]).to(acc.device)
        with acc.autocast():
            seqs = acc.unwrap_model(self.module).generate_student(prefix, local_rows(acc, uniforms).to(acc.device),
                                                                  temperature=cfg.temperature,
                                                                  vocab_size=self._objective().vocab_size)
        return seqs, generated_mask(seqs.shape[0], seqs.shape[1], prefix_len, device=acc.device)

    @property
    def peer_labels(self) -> list[str]:
        """What each peer's held-out figures are logged under: its role name, or ``peer<i>`` in mutual learning."""
        return self.peer_names or [peer_name(i) for i in range(1, len(self.peers) + 1)]

    def _objective(self) -> DistillObjective:
        return self.accelerator.unwrap_model(self.module).objective

    def evaluate(self) -> dict[str, float]:
        """Student held-out loss / perplexity and top-1 agreement with the teacher (all processes); with peers, each
        peer's too under ``peer<i>/``."""
        stats = self._heldout(student=True)
        out = summarize(self.accelerator.reduce(stats.pop(""), "sum").cpu())
        for name, part in stats.items():  # peers (peer<i>/heldout_*) and early exits (exit<l>/heldout_*)
            out.update({f"{name}/{k}": v for k, v in summarize(self.accelerator.reduce(part, "sum").cpu()).items()})
        return out

    def evaluate_teacher(self) -> dict[str, float]:
        stats = self._heldout(student=False)[""]
        return summarize(self.accelerator.reduce(stats, "sum").cpu(), prefix="teacher_heldout", agreement=False)

    @torch.no_grad()
    def _heldout(self, *, student: bool) -> dict[str, torch.Tensor]:
        """This process's summed held-out ``[nll, tokens, agreements]`` under ``""`` (the student, or the teacher), and
        with ``student`` each peer's under ``peer<i>`` and each early exit's under ``exit<l>``; one teacher forward
        per batch for all of them."""
        acc, ev = self.accelerator, self.eval_cfg
        blocks = self.data.heldout.input_ids
        if ev.max_blocks is not None:
            blocks = blocks[: ev.max_blocks]
        world, rank = acc.num_processes, acc.process_index
        mine = blocks[rank::world]
        # Every process runs the same number of forwards (sharded models gather inside forward).
        rounds = math.ceil(math.ceil(len(blocks) / world) / ev.batch_size)
        totals: dict[str, torch.Tensor] = {}
        was_training = self.module.training
        self.module.eval()
        objective = self._objective()
        for r in range(rounds):
            batch = mine[r * ev.batch_size : (r + 1) * ev.batch_size]
            weight = 1.0
            if len(batch) == 0:
                batch, weight = blocks[:1], 0.0
            batch = batch.to(acc.device)
            with acc.autocast():
                t_feats = teacher_features(self.teacher, batch, objective, copy_head=self.teacher_sharded)
                if student:
                    heldout = functools.partial(acc.unwrap_model(self.module).heldout, batch, t_feats,
                                                chunk_tokens=ev.chunk_tokens, copy_head=self.teacher_sharded)
                    out = heldout()
                    stats = {"": out["stats"], **{f"exit{k}": v for k, v in out.get("exit_stats", {}).items()}}
                    for i, name in enumerate(self.peer_labels, start=1):
                        stats[name] = heldout(peer=i)["stats"]
                else:
                    stats = {"": heldout_stats(t_feats, batch, chunk_tokens=ev.chunk_tokens, vocab_size=objective.vocab_size)}
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + weight * value.to(torch.float64)
        self.module.train(was_training)
        return totals

    # ------------------------------------------------------------------ the run
    def _trainer_state(self, step: int, tokens: int, elapsed: float) -> dict[str, Any]:
        return {
            "data_position": self.sampler.state_dict(),
            "tokens": tokens,
            "elapsed_s": elapsed,
            "planned_steps": self.planned_steps if self._horizon_planned else None,
            "max_steps": self.train_cfg.max_steps,
            "max_minutes": self.train_cfg.max_minutes,
            "config": self.config_dict,
        }

    def _set_horizon(self, steps: int, *, planned: bool = False) -> None:
        """Run ``steps`` optimizer steps in all, with the learning-rate schedule decaying over them.

        ``planned``: the count comes from the time budget (it is saved with checkpoints and kept on resume).
        """
        self.planned_steps = steps
        self._horizon_planned = planned
        schedule_of(getattr(self.scheduler, "scheduler", self.scheduler)).max_steps = steps

    def _agreed_seconds(self, seconds: float) -> float:
        """The largest of every process's ``seconds`` (so that all processes take the same decision)."""
        if self.accelerator.num_processes == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, "max")[0])

    def _timed(self, fn, *args, **kwargs):
        t0 = self.clock()
        out = fn(*args, **kwargs)
        return out, self._agreed_seconds(self.clock() - t0)

    def run(self, *, resume: str | Path | None = None) -> TrainResult:
        """Train to ``train.max_steps``, or as many as fit in ``train.max_minutes`` (from ``resume`` when given)."""
        acc, tc = self.accelerator, self.train_cfg
        ckpt_root = self.run_dir / CHECKPOINTS
        step, tokens, elapsed_before = 0, 0, 0.0
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_partial_checkpoints(ckpt_root)
            if resume is None:
                truncate_log(self.run_dir / "log.jsonl", -1)  # a fresh run starts a fresh log
        acc.wait_for_everyone()
        budget = TimeBudget(tc.max_minutes * 60.0, tc.time_probe_steps) if tc.max_minutes else None
        planned = None
        if resume is not None:
            state = load_checkpoint(acc, resume)
            step, tokens, elapsed_before = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
            self.sampler.load_state_dict(state["data_position"])
            same_budget = state.get("max_minutes") == tc.max_minutes and state.get("max_steps") == tc.max_steps
            if tc.max_minutes and same_budget and state.get("planned_steps") is not None:
                planned = int(state["planned_steps"])
            if acc.is_main_process:
                truncate_log(self.run_dir / "log.jsonl", step)
            logger.info("resumed from %s at step %d", resume, step)
        if planned is not None:
            self._set_horizon(planned, planned=True)
        elif resume is not None:  # the checkpoint's horizon was loaded; the current max_steps wins
            self._set_horizon(tc.max_steps)
        else:
            self.planned_steps = tc.max_steps
        replan = budget is not None and planned is None
        plan_step = step if planned is not None else None  # the step of the last plan (None: not planned yet)
        if tc.log_with:
            acc.init_trackers(self.run_name, config=_flat_numbers(self.config_dict))
        log = RunLog(acc, self.run_dir, total_steps=self.planned_steps, initial_step=step, progress_bar=tc.progress_bar)
        teacher_eval = None
        last_eval: dict[str, float] = {}
        last_ckpt: Path | None = None
        stopped_by = "max_steps"
        t_start = self.clock()
        try:
            if resume is None:
                teacher_eval = self.evaluate_teacher()
                last_eval, eval_s = self._timed(self.evaluate)
                log.write({"kind": "eval", "step": 0, **teacher_eval, **last_eval})
            elif budget is not None:
                _, eval_s = self._timed(self.evaluate)  # the time budget needs its duration
            if budget is not None:
                budget.eval_seconds = eval_s
            iteration_start, side_seconds = None, 0.0
            while step < self.planned_steps:
                now = self.clock()
                if budget is not None and iteration_start is not None:
                    # The whole previous iteration (logging included), less its evaluation and checkpoint.
                    budget.record_step(self._agreed_seconds(now - iteration_start - side_seconds))
                    spent = self._agreed_seconds(elapsed_before + now - t_start)
                    again = (plan_step is not None and step - plan_step >= tc.time_probe_steps
                             and 2 * step < self.planned_steps)  # plan again while the decay has not gone far
                    if budget.ready and (replan or again):
                        fitted = budget.plan(step=step, elapsed=spent, max_steps=tc.max_steps,
                                             eval_every=self.eval_cfg.every, save_every=tc.save_every)
                        if replan or budget.adopt(fitted, self.planned_steps):
                            logger.info("train.max_minutes=%g: %.1f s a step, %d step(s) fit%s; the schedule decays over them",
                                        tc.max_minutes, budget.step_seconds, fitted,
                                        "" if replan else f" (at step {step}; {self.planned_steps} were planned)")
                            self._set_horizon(fitted, planned=True)
                            log.set_total(self.planned_steps)
                        replan, plan_step = False, step
                    if budget.ready and budget.next_step_overruns(spent) and step < self.planned_steps:
                        stopped_by = "max_minutes"
                        logger.warning("train.max_minutes=%g: stopping after step %d of %d planned", tc.max_minutes,
                                       step, self.planned_steps)
                        break
                    if step >= self.planned_steps:
                        break
                iteration_start, side_seconds = now, 0.0
                t0 = self.clock()
                record = self.train_step(step)
                step += 1
                step_tokens = self.micro_batch * acc.num_processes * tc.grad_accum_steps * self.data.train.input_ids.shape[1]
                tokens += step_tokens
                dt = self.clock() - t0
                if step % tc.log_every == 0 or step == self.planned_steps:
                    record.update(
                        kind="train",
                        step=step,
                        lr=self.scheduler.get_last_lr()[0],
                        tokens=tokens,
                        tokens_per_s=step_tokens / dt,
                        mem_mb=memory_mb(acc.device),
                        elapsed_s=elapsed_before + self.clock() - t_start,
                    )
                    log.write(record)
                log.advance({"loss": record["loss"]})
                if self.eval_cfg.every and step % self.eval_cfg.every == 0 and step < self.planned_steps:
                    last_eval, eval_s = self._timed(self.evaluate)
                    side_seconds += eval_s
                    log.write({"kind": "eval", "step": step, **last_eval})
                if tc.save_every and step % tc.save_every == 0 and step < self.planned_steps:
                    last_ckpt, ckpt_s = self._timed(
                        save_checkpoint, acc, ckpt_root, step,
                        self._trainer_state(step, tokens, elapsed_before + self.clock() - t_start), keep_last=tc.keep_last,
                    )
                    side_seconds += ckpt_s
                    if budget is not None:
                        budget.checkpoint_seconds = ckpt_s
            last_eval = self.evaluate()
            log.write({"kind": "eval", "step": step, **last_eval})
            total_elapsed = elapsed_before + self.clock() - t_start
            last_ckpt = save_checkpoint(acc, ckpt_root, step, self._trainer_state(step, tokens, total_elapsed), keep_last=tc.keep_last)
        finally:
            log.close()
            if tc.log_with:
                acc.end_training()
        return TrainResult(
            run_dir=self.run_dir,
            steps=step,
            tokens=tokens,
            seconds=total_elapsed,
            final_eval=last_eval,
            teacher_eval=teacher_eval,
            last_checkpoint=last_ckpt,
            module=self.module,
            accelerator=acc,
            planned_steps=self.planned_steps,
            stopped_by=stopped_by,
        )

    def train_step(self, step: int) -> dict[str, float]:
        """Accumulate ``grad_accum_steps`` micro-batches and step; returns the step's mean losses and grad norm."""
        acc, tc = self.accelerator, self.train_cfg
        sums: dict[str, torch.Tensor] = {}
        grad_norm = None
        for micro in range(tc.grad_accum_steps):
            if isinstance(self.sampler, StreamingBlockSampler):
                input_ids, position_ids = (t.to(acc.device) for t in self.sampler.next_batch())
                positions = packed_positions([self.student, *self.peers, self.teacher, *self.roles.values()], position_ids)
            else:
                indices = self.sampler.next_indices()
                input_ids, positions = self._global_rows(indices), nullcontext()
            target = {}
            generated = self.on_policy is not None and is_on_policy(self.on_policy, tc.seed, step * tc.grad_accum_steps + micro)
            if generated:
                input_ids, target["target_mask"] = self._on_policy_rows(indices, step * tc.grad_accum_steps + micro)
            netaug = acc.unwrap_model(self.module).netaug
            if netaug is not None:  # the wider model's width for this micro-batch
                target["netaug_ratio"] = netaug.draw(step * tc.grad_accum_steps + micro)
            with positions:
                if self.teacher_cache is not None:
                    t_feats = self._cached_teacher(indices)
                elif self.mutual is not None and self.mutual.teacher_weight == 0:
                    t_feats = None  # peers learn from the data and each other only
                else:
                    t_feats = self._teacher_features(input_ids)
                if self.roles:
                    target["role_features"] = self._role_features(input_ids)
                with acc.accumulate(self.module):
                    with acc.autocast():
                        out = self.module(input_ids, t_feats, **target)
                    acc.backward(out["loss"])
                    if acc.sync_gradients:
                        max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
                        grad_norm = acc.clip_grad_norm_(self.module.parameters(), max_norm)
                        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                            grad_norm = grad_norm.full_tensor()
                    self.optimizer.step()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            values = {"loss": out["loss"].detach().float(), **out["components"]}
            if self.on_policy is not None:  # the step's share of micro-batches the student generated
                values["on_policy_share"] = torch.tensor(float(generated))
            for k, v in values.items():
                sums[k] = sums.get(k, 0) + v.to(acc.device)
        # loss.balance=auto: the step's loss magnitudes, over its micro-batches and all processes.
        for objective in acc.unwrap_model(self.module).objectives():
            objective.balancer.end_step(lambda t: acc.reduce(t, "sum"))
        names = list(sums)
        stacked = torch.stack([sums[k] / tc.grad_accum_steps for k in names])
        if grad_norm is not None:
            stacked = torch.cat([stacked, torch.as_tensor(grad_norm, dtype=stacked.dtype, device=stacked.device).reshape(1)])
        stacked = acc.reduce(stacked, "mean").tolist()
        record = dict(zip(names, stacked))
        if grad_norm is not None:
            record["grad_norm"] = stacked[-1]
        # Name the term that broke first; the total only when every term is finite.
        for name in sorted(names, key=lambda n: n == "loss"):
            if not math.isfinite(record[name]):
                raise NonFiniteLossError(
                    f"optimizer step {step + 1}: loss component {name!r} is {record[name]}; stopped without saving "
                    f"(the last good checkpoint in {self.run_dir / CHECKPOINTS} is kept). Lower train.lr, "
                    "check the data, or disable the component"
                )
        return record


def _ready_for_training(model: nn.Module, train: TrainConfig) -> None:
    """Gradient checkpointing and per-layer compile as ``train`` asks, then train mode."""
    if train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if train.compile:
        for layer in get_adapter(model).decoder_layers(model):
            layer.compile()
    model.train()


def freeze_groups(model: nn.Module, groups: list[str]) -> int:
    """Stop gradients to the parameters of ``groups`` (``train.freeze``); the number of parameters frozen."""
    if not groups:
        return 0
    adapter = get_adapter(model)
    prefixes = tuple(prefix for group in groups for prefix in adapter.group_prefixes(model, group))
    frozen = 0
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    logger.info("train.freeze=%s: %s of %s student parameters frozen", groups, f"{frozen:,}",
                f"{sum(p.numel() for p in model.parameters()):,}")
    return frozen


def _teacher_sharded(accelerator) -> bool:
    return placement.teacher_is_sharded(accelerator)


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_numbers(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out

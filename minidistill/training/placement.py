"""Placement of the student and the frozen teacher under the parallelism the accelerate config selects.

The launch config alone picks the strategy (see ``launch/``):

* single process / DDP: the student is wrapped by accelerate; the teacher is a frozen replica on every rank.
* FSDP2: the student gets ``fully_shard`` per decoder layer (the layer class comes from the adapter table);
  the teacher is sharded the same way (per layer, then the root) and has no optimizer.
* DeepSpeed ZeRO-2 / ZeRO-3: the student is the DeepSpeed engine accelerate builds; under ZeRO-3 the
  teacher gets its own parameter-partitioned engine without optimizer state, under ZeRO-2 it is a replica.

In every sharded case each rank keeps only its shard of the teacher; a layer's full weights exist only
while that layer runs. :func:`unwrap_full_state_dict` gathers the student's full weights for saving.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..adapters import get_adapter

logger = logging.getLogger(__name__)

DistributedKind = Literal["single", "ddp", "fsdp2", "deepspeed"]

CPU_SHARDING_ENV = "MINIDISTILL_TEST_CPU_SHARDING"
"""Environment variable that test wrapper scripts check before calling :func:`enable_cpu_sharding_for_tests`."""

_GATHER_NUMEL = 50_000_000  # parameters gathered at once when consolidating a ZeRO-3 state dict


class ParallelConfigError(ValueError):
    """The accelerate / DeepSpeed configuration cannot run a distillation."""


# ---------------------------------------------------------------------------------------------- kind


def distributed_kind(accelerator) -> DistributedKind:
    """Which parallelism the accelerator runs: ``single``, ``ddp``, ``fsdp2`` or ``deepspeed``.

    Raises :class:`ParallelConfigError` for FSDP version 1 and for backends minidistill does not place.
    """
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    if dtype == DistributedType.NO or accelerator.num_processes == 1 and dtype not in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    ):
        return "single"
    if dtype == DistributedType.DEEPSPEED:
        return "deepspeed"
    if dtype == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ParallelConfigError(
                f"FSDP version {version} is configured; minidistill shards with FSDP2. "
                "Set `fsdp_version: 2` under fsdp_config in the accelerate config (see launch/fsdp2.yaml)."
            )
        return "fsdp2"
    if dtype.name.startswith("MULTI_"):
        return "ddp"
    raise ParallelConfigError(
        f"distributed type {dtype.name} is not supported; use single, DDP (multi_gpu), FSDP2 or DeepSpeed"
    )


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage (0-3), or None when DeepSpeed is not in use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or distributed_kind(accelerator) != "deepspeed":
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def teacher_is_sharded(accelerator) -> bool:
    """True when :func:`prepare_teacher` shards the teacher (FSDP2, ZeRO-3) rather than replicating it."""
    kind = distributed_kind(accelerator)
    return kind == "fsdp2" or (kind == "deepspeed" and zero_stage(accelerator) == 3)


@contextmanager
def full_weights_init(accelerator) -> Iterator[None]:
    """Models loaded or built inside hold full weights, also under DeepSpeed ZeRO-3.

    Once an Accelerator with a ZeRO-3 config exists, transformers partitions every model at construction
    (``zero.Init``), which leaves each rank with empty parameter stubs. Loading the teacher, measuring
    importance and pruning need the full weights, so do them inside this context; :func:`prepare_student`
    and :func:`prepare_teacher` partition afterwards. A no-op for every other kind.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or distributed_kind(accelerator) != "deepspeed":
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# ---------------------------------------------------------------------------------------------- data


def local_rows(accelerator, global_batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous, disjoint slice of a global batch (rows ``[r*n/W, (r+1)*n/W)``).

    Every rank receives the same global batch (same seed, same order); each keeps its own rows, so the
    union over ranks is exactly the global batch and a step matches a single-process step on it.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    rows = global_batch.shape[0]
    if rows % world:
        raise ParallelConfigError(
            f"a global batch of {rows} rows does not split evenly over {world} processes; "
            f"choose a batch size divisible by {world}"
        )
    per_rank = rows // world
    return global_batch[rank * per_rank : (rank + 1) * per_rank]


# ---------------------------------------------------------------------------------------------- student


def _causal_lm(model: nn.Module) -> nn.Module:
    """``model`` itself, or the first submodule with a model config (e.g. the student inside a wrapper)."""
    for module in model.modules():
        if getattr(getattr(module, "config", None), "model_type", None) is None:
            continue
        try:
            module.get_submodule(get_adapter(module).layers)
        except (AttributeError, ValueError):  # a wrapper exposing the inner model's config
            continue
        return module
    raise ParallelConfigError(f"{type(model).__name__} holds no Hugging Face model (no submodule has a .config)")


def decoder_layer_class_name(model: nn.Module) -> str:
    """Class name of the decoder layers (the FSDP2 wrapping unit) of ``model`` or the causal LM inside it."""
    model = _causal_lm(model)
    layers = get_adapter(model).decoder_layers(model)
    if len(layers) == 0:
        raise ParallelConfigError("the model has no decoder layers to shard")
    return type(layers[0]).__name__


def _configure_fsdp2_wrapping(accelerator, model: nn.Module) -> None:
    """Make accelerate's FSDP2 plugin shard per decoder layer of ``model``.

    Layer class names given in the accelerate config (``fsdp_transformer_layer_cls_to_wrap``) are kept
    when the model has them; otherwise the adapter's decoder-layer class is used.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    present = {type(m).__name__ for m in model.modules()}
    names = plugin.transformer_cls_names_to_wrap
    if names and all(name in present for name in names):
        return
    layer_cls = decoder_layer_class_name(model)
    if names:
        logger.warning(
            "fsdp_transformer_layer_cls_to_wrap=%s is not in this model; sharding per %s instead", names, layer_cls
        )
    plugin.transformer_cls_names_to_wrap = [layer_cls]
    plugin.auto_wrap_policy = transformer_auto_wrap_policy


def _fill_deepspeed_auto(accelerator, micro_batch_size: int | None, max_grad_norm: float | None) -> None:
    """Resolve ``auto`` entries accelerate cannot infer without a dataloader or a clipping value."""
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        if micro_batch_size is None:
            raise ParallelConfigError(
                "the DeepSpeed config has train_micro_batch_size_per_gpu='auto'; pass micro_batch_size "
                "(sequences per process per micro-step) to prepare_student or set an integer in the JSON"
            )
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
        if plugin.is_auto("train_batch_size"):
            config["train_batch_size"] = (
                int(micro_batch_size) * accelerator.gradient_accumulation_steps * accelerator.num_processes
            )
    if plugin.is_auto("gradient_clipping"):
        config["gradient_clipping"] = float(max_grad_norm) if max_grad_norm else 0.0


def prepare_student(
    accelerator,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    micro_batch_size: int | None = None,
    max_grad_norm: float | None = None,
) -> tuple:
    """``accelerator.prepare`` the student, its optimizer and (optional) scheduler for the configured kind.

    FSDP2 shards per decoder layer (class from the adapter table unless the config names one the model
    has). DeepSpeed builds its ZeRO engine as configured; ``micro_batch_size`` and ``max_grad_norm`` fill
    ``train_micro_batch_size_per_gpu`` and ``gradient_clipping`` when the JSON leaves them ``auto``.
    Returns ``(student, optimizer, scheduler)`` (scheduler None when none was given).
    """
    kind = distributed_kind(accelerator)
    if kind == "fsdp2":
        _configure_fsdp2_wrapping(accelerator, student)
    elif kind == "deepspeed":
        _fill_deepspeed_auto(accelerator, micro_batch_size, max_grad_norm)
    if scheduler is None:
        student, optimizer = accelerator.prepare(student, optimizer)
    else:
        student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if kind == "deepspeed" and zero_stage(accelerator) == 3:
        _register_head_as_external(student.module)
    logger.info("student prepared for %s", kind if kind != "deepspeed" else f"deepspeed zero-{zero_stage(accelerator)}")
    return student, optimizer, scheduler


def _register_head_as_external(root: nn.Module) -> None:
    """ZeRO-3: keep the final norm and lm_head gathered for the whole forward of ``root``.

    Chunked logit losses apply the head weight to hidden-state chunks after the lm_head module's own
    forward has returned, when ZeRO-3 would already have released it; registering the weights as
    external parameters of the root module keeps them gathered until the root's forward ends (and
    gathers them again for backward).
    """
    import deepspeed

    for model in _causal_lms(root):  # the student, and each peer of a mutual learning run
        adapter = get_adapter(model)
        for path in (adapter.final_norm, adapter.lm_head):
            for p in model.get_submodule(path).parameters():
                deepspeed.zero.register_external_parameter(root, p)


def _causal_lms(root: nn.Module) -> list[nn.Module]:
    """Every outermost Hugging Face causal LM inside ``root`` (see :func:`_causal_lm`)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in root.modules():
        if id(module) in inside or getattr(getattr(module, "config", None), "model_type", None) is None:
            continue
        try:
            module.get_submodule(get_adapter(module).layers)
        except (AttributeError, ValueError):
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


# ---------------------------------------------------------------------------------------------- teacher


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring gradients (returned for chaining)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _shard_teacher_fsdp2(accelerator, teacher: nn.Module) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root; the root reshards after every forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    parallelism = getattr(accelerator, "parallelism_config", None)
    kwargs = {
        "reshard_after_forward": True,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(parallelism.fsdp_dim_names)] if mesh is not None and parallelism is not None else None,
    }
    for layer in get_adapter(teacher).decoder_layers(teacher):
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)

    # FSDP2 keeps the root's parameters (embeddings, final norm, lm_head) gathered after forward because a
    # backward normally follows; the teacher never runs backward, so free them right away.
    def _reshard_root(module, _args, output):
        module.reshard()
        return output

    teacher.register_forward_hook(_reshard_root)
    return teacher


def _teacher_deepspeed_config(accelerator, teacher: nn.Module) -> dict:
    """The student's resolved DeepSpeed config minus optimizer/scheduler, tuned for a frozen ZeRO-3 model."""
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    hidden = int(getattr(teacher.config, get_adapter(teacher).hidden_size_field))
    zero["stage"] = 3
    zero["reduce_bucket_size"] = hidden * hidden
    zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    zero["stage3_param_persistence_threshold"] = 10 * hidden
    for key in ("offload_optimizer",):
        zero.pop(key, None)
    # Values left "auto" (e.g. when prepare_student was not called first) cannot reach DeepSpeed.
    leftover = [k for k, v in config.items() if v == "auto"]
    if leftover:
        raise ParallelConfigError(
            f"DeepSpeed config still has auto values {leftover}; call prepare_student before prepare_teacher"
        )
    for section in config.values():
        if isinstance(section, dict):
            for k in [k for k, v in section.items() if v == "auto"]:
                del section[k]
    return config


def _partition_teacher_zero3(accelerator, teacher: nn.Module) -> nn.Module:
    """A ZeRO-3 engine for the teacher: partitioned parameters, no optimizer (a frozen inference engine)."""
    import deepspeed

    config = _teacher_deepspeed_config(accelerator, teacher)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def prepare_teacher(accelerator, teacher: nn.Module) -> nn.Module:
    """Place the frozen teacher (eval mode, no gradients) for the configured kind; call after prepare_student.

    single / DDP / ZeRO-0,1,2: a replica on ``accelerator.device``. FSDP2: ``fully_shard`` per decoder
    layer then the root, no optimizer. ZeRO-3: its own DeepSpeed engine with partitioned parameters and no
    optimizer state. Sharded teachers gather one layer at a time during forward, never the whole model.
    """
    freeze(teacher)
    kind = distributed_kind(accelerator)
    if kind == "fsdp2":
        teacher = _shard_teacher_fsdp2(accelerator, teacher)
    elif kind == "deepspeed" and zero_stage(accelerator) == 3:
        teacher = _partition_teacher_zero3(accelerator, teacher)
    else:
        dtype = _replica_dtype(accelerator, kind)
        teacher = teacher.to(device=accelerator.device, dtype=dtype)
    logger.info("teacher placed: %s", "sharded" if teacher_is_sharded(accelerator) else "replica")
    return teacher


def _replica_dtype(accelerator, kind: str) -> torch.dtype | None:
    """Under DeepSpeed bf16/fp16 the student computes in half precision; a replicated teacher matches it."""
    if kind != "deepspeed":
        return None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return None


def local_parameter_numel(model: nn.Module) -> int:
    """Number of parameter elements this rank stores for ``model`` (its shard under FSDP2 / ZeRO-3)."""
    total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partitioned parameter
            total += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):  # DTensor (FSDP2)
            total += p.to_local().numel()
        else:
            total += p.numel()
    return total


# ---------------------------------------------------------------------------------------------- saving


def _zero3_full_state_dict(accelerator, engine) -> dict[str, torch.Tensor] | None:
    """Gather a ZeRO-3 engine's parameters group by group; the main process keeps CPU copies."""
    import deepspeed

    module = getattr(engine, "module", engine)
    names_by_param: dict[int, list[str]] = {}
    params: list[nn.Parameter] = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in names_by_param:
            names_by_param[id(p)] = []
            params.append(p)
        names_by_param[id(p)].append(name)
    keys = list(module.state_dict().keys())
    main = accelerator.is_main_process
    gathered: dict[str, torch.Tensor] = {}
    group: list[nn.Parameter] = []

    def flush() -> None:
        with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
            if main:
                for p in group:
                    full = p.data.detach().to("cpu", copy=True)
                    for name in names_by_param[id(p)]:
                        gathered[name] = full
        group.clear()

    numel = 0
    for p in params:
        group.append(p)
        numel += getattr(p, "ds_numel", p.numel())
        if numel >= _GATHER_NUMEL:
            flush()
            numel = 0
    if group:
        flush()
    if not main:
        return None
    for name, buf in module.named_buffers():
        if name in keys and name not in gathered:
            gathered[name] = buf.detach().to("cpu", copy=True)
    return {k: gathered[k] for k in keys if k in gathered}


def unwrap_full_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's full (unsharded) state dict as CPU tensors on the main process, None on the others.

    A collective under FSDP2 and ZeRO-3: every rank must call it. Keys are those of the unwrapped model
    (tied weights under each of their names). Under DeepSpeed with bf16/fp16 the values are the engine's
    16-bit weights, as DeepSpeed's own 16-bit export gives them.
    """
    kind = distributed_kind(accelerator)
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return {k: v.detach().cpu() for k, v in state.items()} if accelerator.is_main_process else None
    if kind == "deepspeed" and zero_stage(accelerator) == 3:
        return _zero3_full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}


# ---------------------------------------------------------------------------------------------- tests only


def enable_cpu_sharding_for_tests() -> None:
    """Tests only: let FSDP2 and DeepSpeed run on several CPU processes over gloo.

    accelerate reports CPU multi-process runs as MULTI_CPU and then refuses FSDP and DeepSpeed (which it
    enables only for accelerator devices); without a fix DeepSpeed even runs every process as rank 0 of 1.
    This makes accelerate treat the run as MULTI_GPU with the gloo backend on the CPU device, and points
    DeepSpeed at its CPU accelerator with plain gloo collectives (no JIT-compiled shared-memory kernel).
    Call it before creating the ``Accelerator``; never in production.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if getattr(PartialState._prepare_backend, "_minidistill_cpu", False):
        return

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    _prepare_backend._minidistill_cpu = True
    PartialState._prepare_backend = _prepare_backend
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import importlib

        # (``import deepspeed.comm.torch as m`` would bind the torch package that deepspeed.comm imports.)
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (minutes on a small
        # machine) at init; plain gloo collectives give the same results.
        ds_comm_torch.build_shm_op = lambda: None

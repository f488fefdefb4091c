"""Single-process checks of minidistill.parallel: kind detection, data split, config resolution, placement."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import MODEL_TYPES, tiny_model
from torch import nn

from minidistill import parallel
from minidistill.parallel import ParallelConfigError


def fake_accelerator(dtype: DistributedType, num_processes: int = 2, rank: int = 0, **state) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=dtype,
        num_processes=num_processes,
        process_index=rank,
        is_main_process=rank == 0,
        gradient_accumulation_steps=state.pop("gradient_accumulation_steps", 1),
        state=SimpleNamespace(**{"fsdp_plugin": None, "deepspeed_plugin": None, **state}),
    )


class FakeDeepSpeedPlugin:
    def __init__(self, config: dict):
        self.deepspeed_config = config

    def is_auto(self, key: str) -> bool:
        return self.deepspeed_config.get(key) == "auto"


# ---------------------------------------------------------------------------------------------- kind


@pytest.mark.parametrize(
    ("dtype", "processes", "expected"),
    [
        (DistributedType.NO, 1, "single"),
        (DistributedType.MULTI_GPU, 1, "single"),
        (DistributedType.MULTI_GPU, 2, "ddp"),
        (DistributedType.MULTI_CPU, 4, "ddp"),
        (DistributedType.DEEPSPEED, 2, "deepspeed"),
        (DistributedType.DEEPSPEED, 1, "deepspeed"),
    ],
)
def test_distributed_kind(dtype, processes, expected):
    plugin = FakeDeepSpeedPlugin({"zero_optimization": {"stage": 3}})
    assert parallel.distributed_kind(fake_accelerator(dtype, processes, deepspeed_plugin=plugin)) == expected


def test_fsdp2_kind_and_fsdp1_refused():
    acc = fake_accelerator(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    assert parallel.distributed_kind(acc) == "fsdp2"
    assert parallel.teacher_is_sharded(acc)
    acc.state.fsdp_plugin.fsdp_version = 1
    with pytest.raises(ParallelConfigError, match="fsdp_version: 2"):
        parallel.distributed_kind(acc)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_teacher_sharding(stage):
    plugin = FakeDeepSpeedPlugin({"zero_optimization": {"stage": stage}})
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    assert parallel.zero_stage(acc) == stage
    assert parallel.teacher_is_sharded(acc) == (stage == 3)
    assert parallel.zero_stage(fake_accelerator(DistributedType.MULTI_GPU)) is None


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_rows_partition_the_global_batch_in_order(world):
    batch = torch.arange(8 * 3).reshape(8, 3)
    parts = [parallel.local_rows(fake_accelerator(DistributedType.MULTI_GPU, world, rank=r), batch) for r in range(world)]
    assert all(p.shape == (8 // world, 3) for p in parts)
    torch.testing.assert_close(torch.cat(parts), batch)  # disjoint, complete, rank order


def test_local_rows_refuses_uneven_split():
    with pytest.raises(ParallelConfigError, match="divisible by 4"):
        parallel.local_rows(fake_accelerator(DistributedType.MULTI_GPU, 4), torch.zeros(6, 2))


# ---------------------------------------------------------------------------------------------- FSDP2 wrapping


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decoder_layer_class_name_from_adapter(model_type):
    model = tiny_model(model_type)
    name = parallel.decoder_layer_class_name(model)
    assert name == type(model.model.layers[0]).__name__ and name.endswith("DecoderLayer")

    class Wrapper(nn.Module):  # e.g. the trainer's student + objective module
        def __init__(self, inner):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.student = inner

    assert parallel.decoder_layer_class_name(Wrapper(model)) == name
    with pytest.raises(ParallelConfigError, match="no Hugging Face model"):
        parallel.decoder_layer_class_name(nn.Linear(2, 2))


def test_fsdp2_wrapping_uses_adapter_class_unless_config_names_one_present():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = tiny_model("qwen3")
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["LlamaDecoderLayer"], auto_wrap_policy=None)
    acc = fake_accelerator(DistributedType.FSDP, fsdp_plugin=plugin)
    parallel._configure_fsdp2_wrapping(acc, model)  # the yaml's class is not in a qwen3 model
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"]
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap, plugin.auto_wrap_policy = ["Qwen3MLP"], "kept"
    parallel._configure_fsdp2_wrapping(acc, model)  # an explicit class the model has is respected
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3MLP"] and plugin.auto_wrap_policy == "kept"


# ---------------------------------------------------------------------------------------------- DeepSpeed config


def _ds_config() -> dict:
    return {
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "stage3_prefetch_bucket_size": "auto"},
        "gradient_accumulation_steps": 2,
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
    }


def test_fill_deepspeed_auto_batch_and_clipping():
    plugin = FakeDeepSpeedPlugin(_ds_config())
    acc = fake_accelerator(DistributedType.DEEPSPEED, 4, deepspeed_plugin=plugin, gradient_accumulation_steps=2)
    with pytest.raises(ParallelConfigError, match="micro_batch_size"):
        parallel._fill_deepspeed_auto(acc, None, 1.0)
    parallel._fill_deepspeed_auto(acc, 3, 0.5)
    cfg = plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"], cfg["gradient_clipping"]) == (3, 3 * 2 * 4, 0.5)
    plugin = FakeDeepSpeedPlugin(_ds_config())
    parallel._fill_deepspeed_auto(fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin), 1, 0.0)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # no clipping


def test_teacher_deepspeed_config_has_no_optimizer_and_partitions():
    teacher = tiny_model("llama")
    plugin = FakeDeepSpeedPlugin(_ds_config())
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=2, train_batch_size=8, gradient_clipping=1.0)
    before = copy.deepcopy(plugin.deepspeed_config)
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    cfg = parallel._teacher_deepspeed_config(acc, teacher)
    assert plugin.deepspeed_config == before  # the student's config is untouched
    assert "optimizer" not in cfg and "scheduler" not in cfg
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)  # "auto" resolved from the hidden size
    assert zero["stage3_param_persistence_threshold"] == 640
    assert cfg["bf16"] == {"enabled": True}


def test_teacher_deepspeed_config_refuses_unresolved_auto():
    plugin = FakeDeepSpeedPlugin(_ds_config())  # prepare_student has not filled the batch sizes
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    with pytest.raises(ParallelConfigError, match="prepare_student before prepare_teacher"):
        parallel._teacher_deepspeed_config(acc, tiny_model("llama"))


# ---------------------------------------------------------------------------------------------- single process


@pytest.fixture
def single_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_single_process_placement_and_full_state_dict(single_accelerator):
    acc = single_accelerator
    teacher = tiny_model("llama", seed=1).train()
    ids = torch.randint(3, 128, (2, 8))
    placed = parallel.prepare_teacher(acc, teacher)
    assert not placed.training and not any(p.requires_grad for p in placed.parameters())
    assert parallel.local_parameter_numel(placed) == sum(p.numel() for p in placed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, tiny_model("llama", seed=1)(ids).logits)

    student = tiny_model("llama", seed=2, tie_word_embeddings=True).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student, optimizer, scheduler = parallel.prepare_student(acc, student, optimizer)
    assert scheduler is None
    student(ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    state = parallel.unwrap_full_state_dict(acc, student)
    reference = acc.unwrap_model(student).state_dict()
    assert state.keys() == reference.keys()
    for k, v in state.items():
        assert v.device.type == "cpu"
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
        assert v.data_ptr() != reference[k].data_ptr()  # a copy: later steps do not change the saved state


def test_full_weights_init_suspends_zero3_partitioning_at_construction():
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    class Plugin(FakeDeepSpeedPlugin):
        def set_deepspeed_weakref(self):  # what accelerate's plugin does when selected
            self.dschf = HfDeepSpeedConfig(self.deepspeed_config)

    plugin = Plugin({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    plugin.set_deepspeed_weakref()
    try:
        acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
        assert is_deepspeed_zero3_enabled()
        with parallel.full_weights_init(acc):
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()  # restored for what follows
    finally:
        unset_hf_deepspeed_config()


def test_enable_cpu_sharding_for_tests_patches_backend(monkeypatch):
    from accelerate.state import PartialState

    monkeypatch.setattr(PartialState, "_prepare_backend", PartialState._prepare_backend)  # restored afterwards
    monkeypatch.delenv("ACCELERATE_TORCH_DEVICE", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    parallel.enable_cpu_sharding_for_tests()
    parallel.enable_cpu_sharding_for_tests()  # idempotent
    assert PartialState._prepare_backend(None) == ("gloo", DistributedType.MULTI_GPU)
    import os

    assert os.environ["ACCELERATE_TORCH_DEVICE"] == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"

"""Single-process checks of minidistill.training.placement: kind detection, data split, config resolution, placement."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import MODEL_TYPES, tiny_model
from torch import nn

from minidistill.training import placement
from minidistill.training.placement import ParallelConfigError


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
    assert placement.distributed_kind(fake_accelerator(dtype, processes, deepspeed_plugin=plugin)) == expected


def test_fsdp2_kind_and_fsdp1_refused():
    acc = fake_accelerator(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    assert placement.distributed_kind(acc) == "fsdp2"
    assert placement.teacher_is_sharded(acc)
    acc.state.fsdp_plugin.fsdp_version = 1
    with pytest.raises(ParallelConfigError, match="fsdp_version: 2"):
        placement.distributed_kind(acc)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_teacher_sharding(stage):
    plugin = FakeDeepSpeedPlugin({"zero_optimization": {"stage": stage}})
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    assert placement.zero_stage(acc) == stage
    assert placement.teacher_is_sharded(acc) == (stage == 3)
    assert placement.zero_stage(fake_accelerator(DistributedType.MULTI_GPU)) is None


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_rows_partition_the_global_batch_in_order(world):
    batch = torch.arange(8 * 3).reshape(8, 3)
    parts = [placement.local_rows(fake_accelerator(DistributedType.MULTI_GPU, world, rank=r), batch) for r in range(world)]
    assert all(p.shape == (8 // world, 3) for p in parts)
    torch.testing.assert_close(torch.cat(parts), batch)  # disjoint, complete, rank order


def test_local_rows_refuses_uneven_split():
    with pytest.raises(ParallelConfigError, match="divisible by 4"):
        placement.local_rows(fake_accelerator(DistributedType.MULTI_GPU, 4), torch.zeros(6, 2))


# ---------------------------------------------------------------------------------------------- FSDP2 wrapping


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decoder_layer_class_name_from_adapter(model_type):
    model = tiny_model(model_type)
    name = placement.decoder_layer_class_name(model)
    assert name == type(model.model.layers[0]).__name__ and name.endswith("DecoderLayer")

    class Wrapper(nn.Module):  # e.g. the trainer's student + objective module
        def __init__(self, inner):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.student = inner

        @property
        def config(self):  # wrappers may expose the inner model's config
            return self.student.config

    assert placement.decoder_layer_class_name(Wrapper(model)) == name
    with pytest.raises(ParallelConfigError, match="no Hugging Face model"):
        placement.decoder_layer_class_name(nn.Linear(2, 2))


def test_fsdp2_wrapping_uses_adapter_class_unless_config_names_one_present():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = tiny_model("qwen3")
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["LlamaDecoderLayer"], auto_wrap_policy=None)
    acc = fake_accelerator(DistributedType.FSDP, fsdp_plugin=plugin)
    placement._configure_fsdp2_wrapping(acc, model)  # the yaml's class is not in a qwen3 model
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"]
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap, plugin.auto_wrap_policy = ["Qwen3MLP"], "kept"
    placement._configure_fsdp2_wrapping(acc, model)  # an explicit class the model has is respected
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
        placement._fill_deepspeed_auto(acc, None, 1.0)
    placement._fill_deepspeed_auto(acc, 3, 0.5)
    cfg = plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"], cfg["gradient_clipping"]) == (3, 3 * 2 * 4, 0.5)
    plugin = FakeDeepSpeedPlugin(_ds_config())
    placement._fill_deepspeed_auto(fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin), 1, 0.0)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # no clipping


def test_teacher_deepspeed_config_has_no_optimizer_and_partitions():
    teacher = tiny_model("llama")
    plugin = FakeDeepSpeedPlugin(_ds_config())
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=2, train_batch_size=8, gradient_clipping=1.0)
    before = copy.deepcopy(plugin.deepspeed_config)
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    cfg = placement._teacher_deepspeed_config(acc, teacher)
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
        placement._teacher_deepspeed_config(acc, tiny_model("llama"))


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
    placed = placement.prepare_teacher(acc, teacher)
    assert not placed.training and not any(p.requires_grad for p in placed.parameters())
    assert placement.local_parameter_numel(placed) == sum(p.numel() for p in placed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, tiny_model("llama", seed=1)(ids).logits)

    student = tiny_model("llama", seed=2, tie_word_embeddings=True).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student, optimizer, scheduler = placement.prepare_student(acc, student, optimizer)
    assert scheduler is None
    student(ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    state = placement.unwrap_full_state_dict(acc, student)
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
        with placement.full_weights_init(acc):
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
    placement.enable_cpu_sharding_for_tests()
    placement.enable_cpu_sharding_for_tests()  # idempotent
    assert PartialState._prepare_backend(None) == ("gloo", DistributedType.MULTI_GPU)
    assert os.environ["ACCELERATE_TORCH_DEVICE"] == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"


# ---------------------------------------------------------------------------------------------- launch/

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize(
    ("name", "distributed_type", "processes"),
    [
        ("single_gpu.yaml", "NO", 1),
        ("ddp.yaml", "MULTI_GPU", 8),
        ("fsdp2.yaml", "FSDP", 8),
        ("zero2.yaml", "DEEPSPEED", 8),
        ("zero3.yaml", "DEEPSPEED", 8),
        ("multinode_zero3.yaml", "DEEPSPEED", 16),
    ],
)
def test_launch_configs_load_in_accelerate(name, distributed_type, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / name))
    assert str(cfg.distributed_type).split(".")[-1] == distributed_type
    assert cfg.num_processes == processes and cfg.mixed_precision == "bf16"
    if distributed_type == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if distributed_type == "DEEPSPEED":
        ds_file = LAUNCH.parent / cfg.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == (2 if "zero2" in name else 3)
        assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert "optimizer" not in ds  # the trainer's torch AdamW is used
    if name.startswith("multinode"):
        assert cfg.num_machines == 2 and cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _launched(stdout: str) -> list[list[str]]:
    return [line.split()[1:] for line in stdout.splitlines() if line.startswith("accelerate ")]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_slurm_script_starts_one_launch_per_node_with_its_rank(tmp_path):
    # srun runs its command once per node with that node's SLURM_NODEID; scontrol lists the nodes.
    _fake_bin(tmp_path, "srun", 'while [[ "$1" == --* ]]; do shift; done\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    _fake_bin(tmp_path, "scontrol", 'printf "gpu-a17\\ngpu-a18\\n"\n')
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(LAUNCH.parent),
        "ACCELERATE": "echo accelerate",
    }
    out = subprocess.run(
        ["bash", str(LAUNCH / "slurm_multinode.sbatch"), "train.max_steps=3"], env=env, capture_output=True, text=True, check=True
    ).stdout
    launches = _launched(out)
    assert [_flag(a, "--machine_rank") for a in launches] == ["0", "1"]
    for argv in launches:
        assert _flag(argv, "--main_process_ip") == "gpu-a17"
        assert (_flag(argv, "--num_machines"), _flag(argv, "--num_processes")) == ("2", "16")
        assert _flag(argv, "--config_file") == "launch/multinode_zero3.yaml"
        assert argv[-3:] == ["--config", "recipes/configs/llama8b_to_4b_minitron.yaml", "train.max_steps=3"]


def test_deepspeed_hostfile_script_ranks_nodes_by_hostfile_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-a slots=4\n\nnode-b slots=4\nnode-c slots=4\n")
    env = {"PATH": os.environ["PATH"], "HOSTFILE": str(hostfile), "MACHINE_RANK": "2", "ACCELERATE": "echo accelerate"}
    script = str(LAUNCH / "deepspeed_multinode.sh")
    out = subprocess.run(["bash", script, "x=1"], cwd=LAUNCH.parent, env=env, capture_output=True, text=True, check=True).stdout
    (argv,) = _launched(out)
    assert _flag(argv, "--machine_rank") == "2" and _flag(argv, "--main_process_ip") == "node-a"
    assert (_flag(argv, "--num_machines"), _flag(argv, "--num_processes")) == ("3", "12")
    assert _flag(argv, "--deepspeed_multinode_launcher") == "standard"
    assert _flag(argv, "--deepspeed_hostfile") == str(hostfile) and argv[-1] == "x=1"
    hostfile.write_text("node-a slots=4\nnode-b slots=8\n")
    bad = subprocess.run(["bash", script], cwd=LAUNCH.parent, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "same slots" in bad.stderr
    env.pop("MACHINE_RANK")
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    bad = subprocess.run(["bash", script], cwd=LAUNCH.parent, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "MACHINE_RANK" in bad.stderr

"""One distillation step with relational KD (which gathers across ranks) and the other feature-matching terms under whatever ``accelerate launch`` set up.

Usage: ``[accelerate launch ...] match_rkd.py OUT_DIR [gradient]``. A tiny llama teacher (3 layers) and a student pruned from
it (``half_map``) take one step of logit KD + RKD, NST, MMD, FSP, activation boundaries and token attention on a seeded global batch of 4 sequences, each rank keeping its
own rows (with ``gradient``: token attention from saliencies, the student on eager attention). The main process writes ``OUT_DIR/result.json`` (kind, process count, every rank's RKD value, the total
loss and each term averaged over ranks) and ``OUT_DIR/grads.safetensors`` (the full gradient of every student parameter). With
``MINIDISTILL_TEST_CPU_SHARDING=1`` the CPU sharding patch is applied first (FSDP2 / DeepSpeed on CPU processes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidistill.distill.objective import DistillationModule, DistillLossConfig, DistillObjective, teacher_features
from minidistill.training.placement import (
    CPU_SHARDING_ENV,
    distributed_kind,
    enable_cpu_sharding_for_tests,
    full_weights_init,
    local_rows,
    prepare_student,
    prepare_teacher,
    zero_stage,
)

GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 16, 128
LOSS = {
    "logits": {"chunk_tokens": 16},
    "extra": {
        "rkd": {"weight": 5.0, "student_layer": 1},
        "nst": 1.0,
        "mmd": {"weight": 1.0, "kernel": "polynomial"},
        "fsp": 1.0,
        "activation_boundary": 0.5,
        "token_attention": 1.0,
    },
}


def models():
    from transformers import AutoModelForCausalLM, LlamaConfig
    from train_scripts.tiny_setup import half_map

    from minidistill.prune.apply import apply_prune_map

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pmap = half_map(teacher)
    student = apply_prune_map(teacher, pmap)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student, pmap


def full_grad(p: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p).detach().clone()
    g = p.grad
    return (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()


def main() -> None:
    out = Path(sys.argv[1])
    gradient = sys.argv[2:] == ["gradient"]
    torch.set_num_threads(1)
    if os.environ.get(CPU_SHARDING_ENV) == "1":
        enable_cpu_sharding_for_tests()
    from accelerate import Accelerator

    accelerator = Accelerator()
    with full_weights_init(accelerator):
        teacher, student, pmap = models()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    loss = LOSS
    if gradient:
        student.set_attn_implementation("eager")
        loss = {**LOSS, "extra": {**LOSS["extra"], "token_attention": {"source": "gradient"}}}
    objective = DistillObjective(DistillLossConfig.from_dict(loss), teacher=teacher, student=student, prune_map=pmap)
    module = DistillationModule(student, objective)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.0)
    world = accelerator.num_processes
    module, optimizer, _ = prepare_student(accelerator, module, optimizer, micro_batch_size=GLOBAL_BATCH // world, max_grad_norm=0.0)
    teacher = prepare_teacher(accelerator, teacher)
    kind = distributed_kind(accelerator)

    batch = torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    ids = local_rows(accelerator, batch).to(accelerator.device)
    inner = accelerator.unwrap_model(module)
    t_feats = teacher_features(teacher, ids, inner.objective, copy_head=kind != "single" and kind != "ddp")
    result = module(ids, t_feats)
    accelerator.backward(result["loss"])
    names = [n for n, _ in inner.student.named_parameters()]
    grads = {n: full_grad(p, kind) for n, p in zip(names, (p for _, p in inner.student.named_parameters()))}
    components = {k: accelerator.reduce(v.reshape(1), reduction="mean").item() for k, v in result["components"].items() if k.startswith("loss/")}
    rkd_values = accelerator.gather(result["components"]["loss/rkd"].reshape(1)).tolist()
    total = accelerator.reduce(result["loss"].detach(), reduction="mean").item()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: g.contiguous() for n, g in grads.items()}, str(out / "grads.safetensors"))
        info = {"kind": kind, "zero_stage": zero_stage(accelerator), "num_processes": world, "rkd": rkd_values, "loss": total, "components": components}
        (out / "result.json").write_text(json.dumps(info))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

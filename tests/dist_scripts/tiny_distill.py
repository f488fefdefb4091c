"""Minimal logit distillation under whatever parallelism ``accelerate launch`` configured (test harness).

Usage: ``accelerate launch ... tiny_distill.py OUT_DIR [STEPS]``. A tiny tied-embedding llama teacher
(4 layers) teaches a 2-layer student on seeded random tokens; every rank draws the same global batch and
keeps its own rows. It uses minidistill.training.placement directly (no trainer), with the models built inside
``full_weights_init`` after the Accelerator exists, as a trainer must under ZeRO-3. The main process writes ``OUT_DIR/result.json`` (per-step global losses, placement
facts) and the final student to ``OUT_DIR/model``. With ``MINIDISTILL_TEST_CPU_SHARDING=1`` the CPU
sharding patch is applied first (FSDP2 / DeepSpeed on CPU processes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minidistill.training.placement import (
    CPU_SHARDING_ENV,
    distributed_kind,
    enable_cpu_sharding_for_tests,
    full_weights_init,
    local_parameter_numel,
    local_rows,
    prepare_student,
    prepare_teacher,
    unwrap_full_state_dict,
    zero_stage,
)

GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 32, 128


def tiny(num_layers: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main() -> None:
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    torch.set_num_threads(1)
    if os.environ.get(CPU_SHARDING_ENV) == "1":
        enable_cpu_sharding_for_tests()
    from accelerate import Accelerator

    accelerator = Accelerator()
    with full_weights_init(accelerator):
        teacher, student = tiny(4, seed=0), tiny(2, seed=1)
    teacher_numel = sum(p.numel() for p in teacher.parameters())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    student, optimizer, _ = prepare_student(
        accelerator, student, optimizer, micro_batch_size=GLOBAL_BATCH // accelerator.num_processes, max_grad_norm=1.0
    )
    teacher = prepare_teacher(accelerator, teacher)
    kind = distributed_kind(accelerator)

    generator = torch.Generator().manual_seed(1234)
    losses = []
    student.train()
    for _ in range(steps):
        batch = torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
        ids = local_rows(accelerator, batch).to(accelerator.device)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
        s_logp = F.log_softmax(student(input_ids=ids).logits.float(), dim=-1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / ids.numel()
        accelerator.backward(loss)
        if kind != "deepspeed":
            accelerator.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

    state = unwrap_full_state_dict(accelerator, student)
    teacher_local = local_parameter_numel(teacher)
    locals_ = accelerator.gather(torch.tensor([teacher_local])).tolist()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(student)
        unwrapped.save_pretrained(out / "model", state_dict=state, safe_serialization=True)
        result = {
            "kind": kind,
            "zero_stage": zero_stage(accelerator),
            "num_processes": accelerator.num_processes,
            "losses": losses,
            "teacher_numel": teacher_numel,
            "teacher_local_numel": locals_,
        }
        (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

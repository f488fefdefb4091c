"""The demo's distillation step in float32 against bf16 autocast, in the same process.

A step is the demo's: bundled teacher forward, forward + backward of a ~50% MLP-pruned student (30 layers,
MLP 512), the fused logit KD loss with half next-token cross-entropy, fused AdamW. Three variants: float32,
bf16 autocast with the fused loss's head in float32 (``loss.terms.logits.head_precision: float32``), and with the
head in bf16 too (``autocast``). They alternate step by step after a warm-up step each, so that a busy
machine slows all alike; the ratios to float32 are what ``train.mixed_precision: auto_bf16`` buys on this
CPU. It also prints the teacher's loss on one batch in both precisions.

    python bench/precision.py                 # 4 x 256 tokens, 6 timed steps each (2 CPU cores: ~2 min)
    python bench/precision.py --batch 4 --seq 512 --steps 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minidistill.distill.objective import DistillationModule, DistillLossConfig, DistillObjective, teacher_features  # noqa: E402
from minidistill.models import load_model  # noqa: E402
from minidistill.prune.apply import apply_prune_map  # noqa: E402
from minidistill.prune.importance import magnitude_importance  # noqa: E402
from minidistill.prune.select import select_units  # noqa: E402
from minidistill.training.loop import cpu_has_amx_bf16  # noqa: E402

DEMO_STUDENT = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=512)


VARIANTS = {  # name: (autocast to bf16, loss.terms.logits.head_precision)
    "float32": (False, "float32"),
    "bf16 autocast": (True, "float32"),
    "bf16 autocast + bf16 head": (True, "autocast"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up step each)")
    args = p.parse_args()

    teacher = load_model("bundled").eval().requires_grad_(False)
    pmap = select_units(teacher, magnitude_importance(teacher), DEMO_STUDENT)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), generator=gen) for _ in range(args.steps + 1)]

    steps = {}
    for name, (bf16, head) in VARIANTS.items():  # one student and optimizer each, from the same weights
        loss = DistillLossConfig.from_dict({"logits": {"weight": 1.0, "ce_weight": 0.5, "head_precision": head}})
        student = apply_prune_map(teacher, pmap).train()
        objective = DistillObjective(loss, teacher=teacher, student=student, prune_map=pmap)
        module = DistillationModule(student, objective)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)  # as the trainer steps on a CPU

        def step(ids, bf16=bf16, module=module, objective=objective, opt=opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = module(ids, teacher_features(teacher, ids, objective))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out["loss"].item()

        step(batches[0])  # warm-up
        steps[name] = step
    seconds = dict.fromkeys(VARIANTS, 0.0)
    losses = {name: 0.0 for name in VARIANTS}
    for ids in batches[1:]:
        for name in VARIANTS:
            t0 = time.perf_counter()
            losses[name] = steps[name](ids)
            seconds[name] += time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq
    base = tokens / seconds["float32"]

    with torch.no_grad():
        nll = {}
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                nll[bf16] = teacher(batches[0], labels=batches[0]).loss.item()
    print(f"CPU with AMX bf16: {cpu_has_amx_bf16()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.batch} x {args.seq} tokens, {args.steps} steps each, variants alternating step by step")
    for name in VARIANTS:
        speed = tokens / seconds[name]
        print(f"{name:28s} {speed:6.0f} tokens/s  x{speed / base:.2f}  (last loss {losses[name]:.4f})")
    print(f"teacher loss on one batch: float32 {nll[False]:.4f}, bf16 {nll[True]:.4f}")


if __name__ == "__main__":
    main()

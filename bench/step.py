"""One full distillation step, minidistill against a naive Hugging Face KD loop, in the same run.

A step: teacher forward, student forward and backward, logit KL + hidden-state + attention-map losses,
AdamW step. The naive loop asks both models for full logits, ``output_hidden_states=True`` and
``output_attentions=True`` (eager attention) and computes the losses in plain torch; minidistill runs
both models once with SDPA, captures only the paired layers' features and computes the logit loss
chunk by chunk from the final hidden states.

Each variant runs in a fresh subprocess so that peak memory is its own (CPU: peak RSS above the
memory held after set-up; CUDA: ``max_memory_allocated``).

    python bench/step.py                      # bundled teacher and a ~50% student, CPU
    python bench/step.py --device cuda --teacher llama1b --batch 8 --seq 2048 --max-batch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak of the GPU named by torch, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_models(args):
    """Teacher, student (pruned by a fixed map) and the prune map, in float32 on ``args.device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minidistill.adapters import get_adapter
    from minidistill.prune.apply import apply_prune_map
    from minidistill.prune.select import select_units
    from minidistill.prune.importance import magnitude_importance

    if args.teacher == "bundled":
        from minidistill.models import load_model

        teacher = load_model("bundled")
        shape = dict(num_layers=30, hidden_size=576, num_heads=6, num_kv_heads=3, head_dim=64, intermediate_size=640)
    else:  # a random-initialised ~1.1B Llama and a ~50% student
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=64, intermediate_size=5632, vocab_size=32000, max_position_embeddings=8192,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        shape = dict(num_layers=16, hidden_size=1536, num_heads=24, num_kv_heads=8, head_dim=64, intermediate_size=3584)
    importance = magnitude_importance(teacher)
    pmap = select_units(teacher, importance, shape)
    student = apply_prune_map(teacher, pmap)
    attn = "eager" if args.variant == "naive" else "sdpa"
    for m in (teacher, student):
        m.set_attn_implementation(attn)
    teacher.to(args.device).eval().requires_grad_(False)
    student.to(args.device).train()
    return teacher, student, pmap, get_adapter(teacher)


def loss_config(pmap):
    from minidistill.distill.objective import DistillLossConfig

    n = pmap.student_shape["num_layers"]
    return DistillLossConfig.from_dict({
        "logits": {"weight": 1.0},
        "hidden": {"weight": 1.0, "kind": "nmse", "pairing": {"strategy": "prune_map", "student_layers": list(range(n))}},
        "attention": {"weight": 1.0, "pairing": {"strategy": "last_k", "k": 1}},
    })


def minidistill_step_fn(teacher, student, pmap, args):
    from minidistill.distill.objective import DistillationModule, DistillObjective, teacher_features

    objective = DistillObjective(loss_config(pmap), teacher=teacher, student=student, prune_map=pmap).to(args.device)
    module = DistillationModule(student, objective)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=args.device == "cuda")

    def step(input_ids):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            feats = teacher_features(teacher, input_ids, objective)
            out = module(input_ids, feats)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out["loss"])

    return step


def naive_step_fn(teacher, student, pmap, args):
    from minidistill.distill.losses.hidden import ChannelProjection

    s_dim, t_dim = pmap.student_shape["hidden_size"], pmap.teacher["shape"]["hidden_size"]
    proj = ChannelProjection(s_dim, t_dim, kept_channels=pmap.kept_hidden).to(args.device)
    opt = torch.optim.AdamW(list(student.parameters()) + list(proj.parameters()), lr=1e-5, fused=args.device == "cuda")
    pairs = list(enumerate(pmap.kept_layers))
    last_s, last_t = pairs[-1]
    heads = torch.tensor(pmap.layers[last_s].kept_query_heads, device=args.device)

    def step(input_ids):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            with torch.no_grad():
                t = teacher(input_ids, output_hidden_states=True, output_attentions=True)
            s = student(input_ids, output_hidden_states=True, output_attentions=True)
            t_logp = F.log_softmax(t.logits[:, :-1].float(), dim=-1)
            s_logp = F.log_softmax(s.logits[:, :-1].float(), dim=-1)
            kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            hidden = torch.stack([
                ((proj(s.hidden_states[i + 1]).float() - t.hidden_states[j + 1].float()) ** 2).mean()
                / (t.hidden_states[j + 1].float() ** 2).mean()
                for i, j in pairs
            ]).mean()
            ta = t.attentions[last_t][:, heads].float()
            sa = s.attentions[last_s].float()
            att = (ta * (ta.clamp_min(1e-30).log() - sa.clamp_min(1e-30).log())).sum(-1).mean()
            loss = kd + hidden + att
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def run_variant(args) -> dict:
    """Set up one variant, time ``args.steps`` steps after a warm-up, measure peak memory."""
    torch.manual_seed(0)
    teacher, student, pmap, _ = build_models(args)
    make = minidistill_step_fn if args.variant == "minidistill" else naive_step_fn
    step = make(teacher, student, pmap, args)
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device) for _ in range(args.steps + 1)]
    cuda = args.device == "cuda"
    step(batches[0])  # warm-up (allocates optimizer state)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    t0 = time.perf_counter()
    losses = [step(b) for b in batches[1:]]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM:")
    tokens = args.batch * args.seq * args.steps
    out = {
        "variant": args.variant, "tokens_per_s": tokens / seconds, "peak_bytes": peak, "base_bytes": base,
        "activation_peak_bytes": peak - base, "loss": losses[-1],
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
    }
    if cuda:
        out["mfu"] = model_flops(teacher, student, args) * tokens / seconds / peak_flops()
    return out


def model_flops(teacher, student, args) -> float:
    """FLOPs per token: student forward+backward (6N) + teacher forward (2N), plus causal attention scores."""

    def per_token(model, factor):
        cfg = model.config
        n = sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
        if getattr(cfg, "tie_word_embeddings", False):
            n += model.get_output_embeddings().weight.numel()
        attn = 2 * 2 * cfg.num_hidden_layers * args.seq * cfg.num_attention_heads * cfg.head_dim * 0.5
        return factor / 2 * (2 * n + attn)

    return per_token(student, 6) + per_token(teacher, 2)


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), float("nan"))


def max_batch(args) -> int:
    """Largest batch (1, 2, 4, ...) whose step fits in GPU memory."""
    teacher, student, pmap, _ = build_models(args)
    make = minidistill_step_fn if args.variant == "minidistill" else naive_step_fn
    step = make(teacher, student, pmap, args)
    best, b = 0, 1
    while b <= 1024:
        try:
            step(torch.randint(0, teacher.config.vocab_size, (b, args.seq), device=args.device))
            best, b = b, b * 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--teacher", default="bundled", choices=["bundled", "llama1b"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch each variant fits (CUDA)")
    p.add_argument("--variant", choices=["naive", "minidistill"], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.variant:  # child process
        result = max_batch(args) if args.json and args.max_batch else run_variant(args)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for variant in ("naive", "minidistill"):
        for what in ((False, True) if args.max_batch else (False,)):
            cmd = [sys.executable, __file__, "--variant", variant, "--json", "--device", args.device, "--teacher", args.teacher,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)] + (["--max-batch"] if what else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[(variant, what)] = json.loads(line[7:])
    naive, ours = results[("naive", False)], results[("minidistill", False)]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    gib = 2**30
    rows = [
        "| variant | tokens/s | peak memory (GiB) | peak above set-up (GiB) |" + (" MFU |" if args.device == "cuda" else ""),
        "|---|---|---|---|" + ("---|" if args.device == "cuda" else ""),
    ]
    for r in (naive, ours):
        rows.append(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['peak_bytes'] / gib:.2f} | {r['activation_peak_bytes'] / gib:.2f} |"
                    + (f" {r['mfu']:.1%} |" if args.device == "cuda" else ""))
    print(f"## Distillation step: {args.teacher} teacher, batch {args.batch} x {args.seq}, {device}, {time.strftime('%Y-%m-%d')}")
    print(f"teacher {naive['teacher_params']:,} params, student {naive['student_params']:,} params; {args.steps} timed steps after one warm-up\n")
    print("\n".join(rows))
    print(f"\nminidistill / naive: tokens/s x{ours['tokens_per_s'] / naive['tokens_per_s']:.2f}, "
          f"peak memory x{ours['peak_bytes'] / naive['peak_bytes']:.2f}, "
          f"peak above set-up x{ours['activation_peak_bytes'] / max(naive['activation_peak_bytes'], 1):.2f}")
    if args.max_batch:
        print(f"largest batch at seq {args.seq}: naive {results[('naive', True)]}, minidistill {results[('minidistill', True)]}")
    if not math.isfinite(ours["loss"]):
        sys.exit("minidistill loss is not finite")


if __name__ == "__main__":
    main()

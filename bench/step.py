"""One full distillation step, minidistill against a naive Hugging Face KD loop, in the same run.

A step: teacher forward, student forward and backward, logit KL + hidden-state + attention-map losses,
AdamW step. The naive loop asks both models for full logits, ``output_hidden_states=True`` and
``output_attentions=True`` (eager attention) and computes the losses in plain torch; minidistill runs
both models once with SDPA, captures only the paired layers' features and computes the logit loss
chunk by chunk from the final hidden states.

Each variant runs in a fresh subprocess so that peak memory is its own (CPU: peak RSS above the
memory held after set-up; CUDA: ``max_memory_allocated``).

    python bench/step.py --write              # bundled teacher and a ~50% student, CPU, 4x256 and 2x1024
    python bench/step.py --device cuda --teacher llama1b --shapes 8x2048 --max-batch --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "## Distillation step"

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


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x256,2x1024"`` -> [(4, 256), (2, 1024)]."""
    try:
        return [(int(b), int(t)) for b, t in (item.lower().split("x") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"--shapes {text!r}: give BATCHxSEQ items separated by commas, e.g. 4x256,2x1024") from None


def measure(args, batch: int, seq: int) -> dict:
    """Both variants (and their largest batch with ``--max-batch``) at ``batch`` x ``seq``, one subprocess each."""
    results = {}
    for variant in ("naive", "minidistill"):
        for find_max in ((False, True) if args.max_batch else (False,)):
            cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--teacher", args.teacher,
                   "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps)] + (["--max-batch"] if find_max else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{variant} at {batch}x{seq} failed:\n{out.stderr[-3000:]}")
            results[(variant, find_max)] = json.loads(line[7:])
    return results


def render(args, measured: dict) -> str:
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    gib = 2**30
    first = next(iter(measured.values()))[("naive", False)]
    lines = [
        SECTION,
        "",
        f"`python bench/step.py --device {args.device} --teacher {args.teacher} --shapes {args.shapes} --steps {args.steps}"
        f"{' --max-batch' if args.max_batch else ''}` on {datetime.date.today().isoformat()}, {device}, torch {torch.__version__}"
        f"{', bf16 autocast' if cuda else ', float32'}. Teacher {first['teacher_params']:,} parameters, student "
        f"{first['student_params']:,}. A step: teacher forward, student forward + backward, logit KL + hidden-state "
        "(every student layer) + attention-map (last layer) losses, AdamW step; tokens/s over "
        f"{args.steps} steps after a warm-up step, each variant in a fresh process. Peak memory: "
        + ("`max_memory_allocated`" if cuda else "peak RSS (VmHWM)") + "; above set-up: minus the memory held after the warm-up step "
        "(weights, gradients, optimizer state).",
        "",
        "| batch x seq | variant | tokens/s | peak memory (GiB) | peak above set-up (GiB) |" + (" MFU |" if cuda else ""),
        "|---|---|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    ratios = []
    for (batch, seq), res in measured.items():
        naive, ours = res[("naive", False)], res[("minidistill", False)]
        for r in (naive, ours):
            lines.append(f"| {batch}x{seq} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['peak_bytes'] / gib:.2f} "
                         f"| {r['activation_peak_bytes'] / gib:.2f} |" + (f" {r['mfu']:.1%} |" if cuda else ""))
        ratios.append(
            f"- {batch}x{seq}: minidistill / naive tokens/s x{ours['tokens_per_s'] / naive['tokens_per_s']:.2f}, "
            f"peak memory x{ours['peak_bytes'] / naive['peak_bytes']:.2f}, peak above set-up "
            f"x{ours['activation_peak_bytes'] / max(naive['activation_peak_bytes'], 1):.2f}"
            + (f"; largest batch at seq {seq}: naive {res[('naive', True)]}, minidistill {res[('minidistill', True)]}"
               if args.max_batch else "")
        )
    lines += ["", "Ratios (goal: tokens/s >= 1.1x, peak memory <= 0.6x):", "", *ratios]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--teacher", default="bundled", choices=["bundled", "llama1b"])
    p.add_argument("--shapes", default="4x256,2x1024", help="BATCHxSEQ list, e.g. 4x256,2x1024")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch each variant fits (CUDA)")
    p.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    p.add_argument("--variant", choices=["naive", "minidistill"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.variant:  # child process
        result = max_batch(args) if args.max_batch else run_variant(args)
        print("RESULT " + json.dumps(result))
        return
    measured = {}
    for batch, seq in parse_shapes(args.shapes):
        measured[(batch, seq)] = measure(args, batch, seq)
        ours = measured[(batch, seq)][("minidistill", False)]
        if not math.isfinite(ours["loss"]):
            sys.exit(f"minidistill loss is not finite at {batch}x{seq}")
    table = render(args, measured)
    print(table)
    if args.write:
        write_section(table)


if __name__ == "__main__":
    main()

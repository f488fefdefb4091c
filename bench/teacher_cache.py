"""Teacher cache on the bundled teacher: training-step speed against the live teacher, and fidelity per k.

Speed (default): builds a top-k cache of the teacher over a few token blocks, then times distillation steps
(student forward and backward of the logit term, AdamW step) with the teacher read from the cache and with a
teacher forward per step, and prints tokens/s of both, their ratio, and the cache's bytes per token and build time.

Fidelity (``--fidelity``): on train blocks of the bundled corpus, builds the cache for each ``--ks`` and
compares, per token, the teacher's full next-token distribution p with the distribution the cache
reconstructs: its top-k probabilities as stored, and the stored rest mass spread evenly over the other
tokens (renormalised for the rounding of the stored values). It prints a markdown table of the mean
KL(p || reconstruction), that KL over the teacher's mean entropy, the teacher mass in the top-k, and the
cache's bytes per token over dense float16 log-probabilities. With ``--student-steps N`` it also distills
a pruned student for N equal-token steps from the cache at ``--k`` and from the live teacher and prints
both held-out perplexities and their ratio.

    python bench/teacher_cache.py --quick          # 2 x 128 tokens, 3 timed steps each, k=32 + 32 tail draws (2 CPU cores: ~30 s)
    python bench/teacher_cache.py --batch 4 --seq 512 --steps 10 --device cuda
    python bench/teacher_cache.py --fidelity --quick   # 4 x 128 tokens, k in 8 16 64 256 (2 CPU cores: ~2 min)
    python bench/teacher_cache.py --fidelity --blocks 32 --seq 256 --student-steps 40 --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minidistill.data import DataConfig, TextData, TokenBlocks, build_text_data  # noqa: E402
from minidistill.distill.objective import (  # noqa: E402
    CachedTeacher,
    CaptureRequest,
    DistillationModule,
    DistillLossConfig,
    DistillObjective,
    model_features,
    teacher_features,
)
from minidistill.distill.teacher_cache import TeacherCacheConfig, build_teacher_cache  # noqa: E402
from minidistill.models import load_model, load_tokenizer  # noqa: E402
from minidistill.prune.apply import apply_prune_map  # noqa: E402
from minidistill.prune.importance import magnitude_importance  # noqa: E402
from minidistill.prune.select import select_units  # noqa: E402
from minidistill.training.config import EvalConfig, TrainConfig  # noqa: E402
from minidistill.training.loop import Distiller  # noqa: E402

SPEED_STUDENT = dict(num_layers=15, hidden_size=576, num_heads=6, num_kv_heads=3, head_dim=64, intermediate_size=640)
FIDELITY_STUDENT = dict(num_layers=6, hidden_size=576, num_heads=6, num_kv_heads=3, head_dim=64, intermediate_size=640)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="speed: 2 x 128 tokens, 3 timed steps (after one warm-up); fidelity: 4 x 128 tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--k", type=int, default=TeacherCacheConfig.k, help="k of the speed run and of the --student-steps comparison")
    parser.add_argument("--tail", type=int, default=TeacherCacheConfig.tail_samples,
                        help="tail draws of the speed run and of the --student-steps comparison (the KL table uses none: "
                             "a draw leaves the undrawn tail tokens at zero mass)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fidelity", action="store_true", help="KL and mass of the cache's distribution per k, not speed")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 64, 256], help="fidelity: the k values")
    parser.add_argument("--blocks", type=int, default=16, help="fidelity: train blocks of the bundled corpus measured")
    parser.add_argument("--student-steps", type=int, default=0,
                        help="fidelity: also distill a student this many steps from the cache at --k and from the live teacher")
    parser.add_argument("--eval-blocks", type=int, default=8, help="fidelity: held-out blocks scored after --student-steps")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.blocks = 2, 128, 3, 4
    if args.fidelity:
        fidelity(args)
    else:
        speed(args)


def speed(args) -> None:
    """Tokens/s of distillation steps from the cache and from the live teacher."""
    teacher = load_model("bundled")
    tokenizer = load_tokenizer("bundled")
    shape = SPEED_STUDENT
    student = apply_prune_map(teacher, select_units(teacher, magnitude_importance(teacher), shape))
    teacher.to(args.device).eval().requires_grad_(False)
    student.to(args.device).train()
    vocab = len(tokenizer)
    blocks = torch.randint(0, vocab, ((args.steps + 1) * args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_teacher_cache(TeacherCacheConfig(enabled=True, k=args.k, tail_samples=args.tail, batch_size=args.batch), teacher, blocks,
                                    Path(tmp) / "cache", tokenizer_vocab=tokenizer.get_vocab())
        build_s = time.perf_counter() - t0
        objective = DistillObjective(DistillLossConfig(), teacher=teacher, student=student)
        module = DistillationModule(student, objective)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

        def step(i: int, cached: bool) -> None:
            rows = torch.arange(i * args.batch, (i + 1) * args.batch)
            ids = blocks[rows].to(args.device)
            if cached:
                t = CachedTeacher(*(x.to(args.device) for x in cache.rows(rows)))
            else:
                t = teacher_features(teacher, ids, objective)
            module(ids, t)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        speed = {}
        for cached in (False, True):
            step(0, cached)  # warm-up
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(1, args.steps + 1):
                step(i, cached)
            if args.device == "cuda":
                torch.cuda.synchronize()
            speed[cached] = args.steps * args.batch * args.seq / (time.perf_counter() - t0)
        print(f"teacher: bundled (SmolLM2-135M), student: {shape['num_layers']} layers, {args.batch} x {args.seq} tokens, "
              f"k={args.k}, {args.tail} tail draws, device {args.device}")
        print(f"live teacher step:   {speed[False]:.0f} tokens/s")
        print(f"cached teacher step: {speed[True]:.0f} tokens/s")
        print(f"ratio cached / live: {speed[True] / speed[False]:.2f}")
        print(f"cache: {cache.bytes_per_token():.0f} bytes per token ({cache.manifest['dtype']} values, int32 ids), "
              f"built in {build_s:.1f} s for {blocks.numel()} tokens")


@torch.no_grad()
def reconstruction_stats(features, cache, vocab: int, chunk_tokens: int = 256) -> dict[str, float]:
    """Summed KL(p || cache reconstruction), top-k mass and teacher entropy (float64) over all cached positions.

    ``features``: the teacher's on the cached blocks, in block order. The reconstruction gives each top-k token
    its stored probability and every other token ``rest / (vocab - k)``, renormalised to sum to one.
    """
    h = features.final_hidden[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    w = features.head_weight.float()
    bias = None if features.head_bias is None else features.head_bias.float()
    idx, top_lp, rest_lp = cache.rows(torch.arange(features.final_hidden.shape[0]))
    k = idx.shape[-1]
    idx, top_lp, rest_lp = idx.reshape(-1, k), top_lp.reshape(-1, k), rest_lp.reshape(-1)
    spread = math.log(vocab - k)  # k < vocab: the rest holds at least one token
    out = {"kl": 0.0, "mass": 0.0, "entropy": 0.0, "tokens": h.shape[0]}
    for start in range(0, h.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        lp = F.log_softmax(F.linear(h[sl].float(), w, bias)[:, :vocab].double(), -1)
        p = lp.exp()
        kept = idx[sl].long()
        log_q = (rest_lp[sl].double() - spread).unsqueeze(-1).expand_as(lp).scatter(-1, kept, top_lp[sl].double())
        log_q = log_q - torch.logsumexp(log_q, -1, keepdim=True)
        out["kl"] += float(torch.where(p > 0, p * (lp - log_q), torch.zeros_like(p)).sum())
        out["mass"] += float(p.gather(-1, kept).sum())
        out["entropy"] += float(-(p * lp).sum())
    return out


def _student(teacher):
    return apply_prune_map(teacher, select_units(teacher, magnitude_importance(teacher), FIDELITY_STUDENT))


def _distilled_perplexity(args, teacher, train: torch.Tensor, heldout: torch.Tensor, run_dir: Path, cache) -> float:
    """Held-out perplexity of a fresh pruned student after ``--student-steps`` steps (same seed, same blocks)."""
    student = _student(teacher)
    data = TextData(TokenBlocks(train), TokenBlocks(heldout), DataConfig(seq_len=args.seq))
    train_cfg = TrainConfig.from_dict({"max_steps": args.student_steps, "batch_size": args.batch, "lr": 3e-4,
                                       "warmup_steps": 1, "progress_bar": False, "save_every": 0, "mixed_precision": "no"})
    d = Distiller(student=student, teacher=teacher, data=data, prune_map=None, loss=DistillLossConfig(), train=train_cfg,
                  eval=EvalConfig(), run_dir=run_dir, config_dict={}, teacher_cache=cache)
    return d.run().final_eval["heldout_perplexity"]


def fidelity(args) -> None:
    """Markdown table of the cache's fidelity to the full teacher distribution per k (and optionally a student)."""
    teacher = load_model("bundled").to(args.device).eval().requires_grad_(False)
    tokenizer = load_tokenizer("bundled")
    vocab = min(len(tokenizer), teacher.get_output_embeddings().weight.shape[0])
    too_big = [k for k in args.ks + ([args.k] if args.student_steps else []) if not 1 <= k < vocab]
    if too_big:
        raise SystemExit(f"--ks / --k: {too_big} outside 1..{vocab - 1} (the teacher's vocabulary has {vocab} tokens)")
    data = build_text_data(DataConfig(seq_len=args.seq), tokenizer)
    if len(data.train) < args.blocks:
        raise SystemExit(f"--blocks={args.blocks}: the bundled corpus has {len(data.train)} train blocks of {args.seq} tokens")
    blocks = data.train.input_ids[: args.blocks]
    with torch.no_grad():
        features = model_features(teacher, blocks.to(args.device), CaptureRequest())
    dense_bytes = 2 * vocab
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            cfg = TeacherCacheConfig(enabled=True, k=k, tail_samples=0, batch_size=args.batch)
            cache = build_teacher_cache(cfg, teacher, blocks, Path(tmp) / f"k{k}", tokenizer_vocab=tokenizer.get_vocab(),
                                        vocab_size=vocab)
            rows.append((k, reconstruction_stats(features, cache, vocab), cache.bytes_per_token()))
        ppl = None
        if args.student_steps:
            train = data.train.input_ids[: args.student_steps * args.batch]
            heldout = data.heldout.input_ids[: args.eval_blocks]
            cache = build_teacher_cache(TeacherCacheConfig(enabled=True, k=args.k, tail_samples=args.tail, batch_size=args.batch), teacher, train,
                                        Path(tmp) / "student-cache", tokenizer_vocab=tokenizer.get_vocab(), vocab_size=vocab)
            ppl = {"live": _distilled_perplexity(args, teacher, train, heldout, Path(tmp) / "live", None),
                   "cached": _distilled_perplexity(args, teacher, train, heldout, Path(tmp) / "cached", cache)}
    tokens = rows[0][1]["tokens"]
    entropy = rows[0][1]["entropy"] / tokens
    print(f"teacher: bundled (SmolLM2-135M), vocabulary {vocab}, {args.blocks} x {args.seq} tokens of the bundled corpus "
          f"({tokens} predicted positions), teacher entropy {entropy:.3f} nats/token, float16 cache values\n")
    print("| k | top-k teacher mass | KL(teacher ‖ cache) nats/token | KL / teacher entropy | cache bytes/token | bytes / dense float16 |")
    print("|---|---|---|---|---|---|")
    for k, st, per_token in rows:
        kl = st["kl"] / tokens
        print(f"| {k} | {st['mass'] / tokens:.4f} | {kl:.4f} | {kl / entropy:.4f} | {per_token:.0f} | {per_token / dense_bytes:.4f} |")
    if ppl is not None:
        print(f"\nstudent: {FIDELITY_STUDENT['num_layers']} layers pruned from the teacher, {args.student_steps} steps of "
              f"{args.batch} x {args.seq} tokens (same blocks and order), {len(heldout)} held-out blocks\n")
        print("| teacher | held-out perplexity |")
        print("|---|---|")
        print(f"| live | {ppl['live']:.2f} |")
        print(f"| cache k={args.k}, {args.tail} tail draws | {ppl['cached']:.2f} |")
        print(f"| ratio cache / live | {ppl['cached'] / ppl['live']:.4f} |")


if __name__ == "__main__":
    main()

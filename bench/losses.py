"""Peak memory and time of logit distillation losses: plain (full logits) vs fused chunked.

For each divergence, one forward + backward of the loss from final hidden states and lm_head weights:

- ``plain``: ``logits = hidden @ W^T`` for both models, then :class:`LogitKDLoss`.
- ``fused``: :class:`FusedLogitKDLoss` (chunks of ``--chunk`` tokens, no full logits).
- ``trl``: full logits, then TRL's ``GKDTrainer.generalized_jsd_loss`` (generalized JSD, beta 0.5) as a
  peer figure, when ``trl`` is installed (``pip install --no-deps trl``, the ``bench`` extra).

Each measurement runs in a fresh subprocess. Peak memory is the growth over the memory held after
the inputs are built: on CPU the process's max RSS (``getrusage``) minus its RSS before the loss, on
CUDA ``torch.cuda.max_memory_allocated`` minus the allocated bytes before. Times are wall-clock
seconds of forward + backward (after ``--warmup`` untimed runs, best of ``--repeats``), taken one
implementation after the other in the same invocation; the table reports fused/plain ratios.

Usage: ``python bench/losses.py [--device cpu|cuda] [--batch 4 --seq 1024 --vocab 49152 --hidden 576]``
(``--write`` puts the table into bench/RESULTS.md under "Distillation losses").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_section  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Distillation losses"
ALL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "skew_kl")


# ---------------------------------------------------------------------------------------------- worker
def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(case: dict) -> dict:
    """One measurement (runs in its own process); returns times, peak bytes and the loss value."""
    import resource

    import torch
    import torch.nn.functional as F

    from minidistill.distill.losses.fused import FusedLogitKDLoss
    from minidistill.distill.losses.logits import LogitKDLoss

    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    b, s, v, d = case["batch"], case["seq"], case["vocab"], case["hidden"]
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(b, s, d, generator=g).to(device).requires_grad_(True)
    w_s = (torch.randn(v, d, generator=g) / d**0.5).to(device).requires_grad_(True)
    h_t = torch.randn(b, s, d, generator=g).to(device)
    w_t = (1.5 * torch.randn(v, d, generator=g) / d**0.5).to(device)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[:, :8] = -100
    labels = labels.to(device)

    impl, divergence = case["impl"], case["divergence"]
    if impl == "fused":
        fused = FusedLogitKDLoss(divergence, chunk_tokens=case["chunk"])

        def step():
            return fused(h_s, w_s, h_t, w_t, labels)
    elif impl == "plain":
        plain = LogitKDLoss(divergence)

        def step():
            with torch.no_grad():
                logits_t = F.linear(h_t, w_t)
            return plain(F.linear(h_s, w_s), logits_t, labels)
    elif impl == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl import GKDTrainer
        except ImportError:
            from trl.experimental.gkd import GKDTrainer

        def step():
            with torch.no_grad():
                logits_t = F.linear(h_t, w_t)
            return GKDTrainer.generalized_jsd_loss(F.linear(h_s, w_s), logits_t, labels, beta=0.5)
    else:
        raise ValueError(impl)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_once() -> tuple[float, float]:
        h_s.grad = w_s.grad = None
        sync()
        start = time.perf_counter()
        loss = step()
        loss.backward()
        sync()
        return time.perf_counter() - start, float(loss)

    for _ in range(case["warmup"]):
        run_once()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss_bytes()
    times, value = [], None
    for _ in range(case["repeats"]):
        seconds, value = run_once()
        times.append(seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": min(times), "peak_bytes": max(peak, 0), "loss": value}


# ---------------------------------------------------------------------------------------------- driver
def _measure(case: dict) -> dict | None:
    """Run one case in a fresh interpreter; None when it fails (e.g. trl missing, out of memory)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        print(f"  {case['impl']} {case['divergence']} failed: {tail[0]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _rows(args, size: dict, divergences: tuple[str, ...], with_trl: bool) -> list[str]:
    rows = []
    shape = f"{size['batch']}x{size['seq']}, V={size['vocab']}, D={size['hidden']}"
    base = dict(device=args.device, threads=args.threads, chunk=args.chunk, warmup=args.warmup, repeats=args.repeats, **size)
    for divergence in divergences:
        plain = _measure(dict(base, impl="plain", divergence=divergence))
        fused = _measure(dict(base, impl="fused", divergence=divergence))
        if plain is None or fused is None:
            continue
        rows.append(
            f"| {shape} | {divergence} | ours, plain | {plain['seconds']:.2f} | {_gib(plain['peak_bytes'])} | 1.00 | 1.00 | {plain['loss']:.5f} |"
        )
        rows.append(
            f"| {shape} | {divergence} | ours, fused (chunk {args.chunk}) | {fused['seconds']:.2f} | {_gib(fused['peak_bytes'])} "
            f"| {fused['seconds'] / plain['seconds']:.2f} | {fused['peak_bytes'] / max(plain['peak_bytes'], 1):.3f} | {fused['loss']:.5f} |"
        )
        print(rows[-2], rows[-1], sep="\n", flush=True)
        if with_trl and divergence == "jsd":
            trl = _measure(dict(base, impl="trl", divergence="jsd"))
            if trl is not None:
                rows.append(
                    f"| {shape} | jsd | TRL generalized_jsd_loss | {trl['seconds']:.2f} | {_gib(trl['peak_bytes'])} "
                    f"| {trl['seconds'] / plain['seconds']:.2f} | {trl['peak_bytes'] / max(plain['peak_bytes'], 1):.3f} | {trl['loss']:.5f} |"
                )
                print(rows[-1], flush=True)
    return rows


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=256, help="fused chunk_tokens")
    parser.add_argument("--divergences", default="forward_kl,jsd", help="comma list measured at full size ('' for none)")
    parser.add_argument("--small-factor", type=int, default=16,
                        help="also measure every divergence at seq/this with chunk/this (0: skip)")
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs (default 0 on CPU, at least 1 at the small size; 2 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, best kept (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL peer measurement")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 0)
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 1)
    with_trl = not args.no_trl
    size = dict(batch=args.batch, seq=args.seq, vocab=args.vocab, hidden=args.hidden)
    started = time.time()
    load = os.getloadavg()[0]
    rows = _rows(args, size, tuple(d for d in args.divergences.split(",") if d), with_trl)
    if args.small_factor:
        # Same number of chunks as at full size, so the memory ratio is comparable.
        small = dict(size, seq=max(1, args.seq // args.small_factor))
        small_args = argparse.Namespace(**{**vars(args), "chunk": max(1, args.chunk // args.small_factor),
                                         "warmup": max(args.warmup, 1)})
        rows += _rows(small_args, small, ALL_DIVERGENCES, with_trl)
    header = [
        f"## {SECTION}",
        "",
        f"`python bench/losses.py --device {args.device}` on {datetime.date.today().isoformat()}, "
        f"{_device_name(args.device)}, {args.threads} threads (load average at start {load:.1f}), torch forward + backward of the loss from final "
        f"hidden states and lm_head weights of student and teacher (float32, mean over tokens). Peak = memory "
        f"growth over the inputs ({'max_memory_allocated' if cuda else 'max RSS'}, fresh process per row); time = "
        f"best of {args.repeats} run(s) after {args.warmup} warm-up run(s) at full size, at least 1 warm-up at the small size. "
        "Ratios are against `ours, plain` of the same row group (fused goal: memory <= 0.125 at time <= 1.0).",
        "",
        "| shape (BxS) | divergence | implementation | seconds | peak GiB | time / plain | memory / plain | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + f"\n\nTotal bench wall time: {time.time() - started:.0f} s.\n"
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()

"""Streaming resume: time to the first batch after a resume from a stream cursor against a replay.

Writes the bundled news + Wikipedia documents ``--copies`` times into ``--files`` local .txt files (one
document per line), streams them with the bundled teacher's tokenizer through the trainer's
:class:`StreamingBlockSampler` for ``--steps`` micro-batches of ``--batch`` x ``--seq`` tokens, saves the
sampler's state, and then times, in this process, a new sampler that resumes from that state (its
cursor) and one that resumes from the same state without the cursor (the replay of checkpoints written
before cursors: every consumed document read and tokenized again). Both must give the same batch; the
ratio of their times is the speed-up of a resume at that depth of the stream.

    python bench/stream_resume.py                    # ~10 s on 2 CPU cores
    python bench/stream_resume.py --steps 6000 --write
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

from results_file import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)
from minidistill.corpora import bundled_documents  # noqa: E402
from minidistill.data import DataConfig  # noqa: E402
from minidistill.models import load_tokenizer  # noqa: E402
from minidistill.streaming import build_streaming_data  # noqa: E402
from minidistill.training.sampler import CURSOR_KEY, StreamingBlockSampler  # noqa: E402


def write_corpus(folder: Path, files: int, copies: int) -> int:
    """The bundled documents, ``copies`` times, spread over ``files`` .txt files; returns the bytes written."""
    docs = [" ".join(d.split()) for name in ("news", "wiki") for d in bundled_documents(name)]
    docs = [d for d in docs if d]
    for i in range(files):
        with (folder / f"part-{i:03d}.txt").open("w") as fh:
            for _ in range(copies // files or 1):
                fh.write("\n".join(docs) + "\n")
    return sum(p.stat().st_size for p in folder.iterdir())


def timed_resume(stream, state: dict, batch: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    sampler = StreamingBlockSampler(stream, batch)
    sampler.load_state_dict(state)
    ids, _ = sampler.next_batch()
    return time.perf_counter() - start, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="micro-batches taken before the checkpoint")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--copies", type=int, default=8, help="copies of the bundled documents over all files")
    ap.add_argument("--write", action="store_true", help="write the result into bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer("bundled")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = write_corpus(folder, args.files, args.copies)
        cfg = DataConfig(source=str(folder / "part-*.txt"), seq_len=args.seq, streaming=True, heldout_documents=10, sample_blocks=1)
        stream = build_streaming_data(cfg, tokenizer).stream
        sampler = StreamingBlockSampler(stream, args.batch)
        start = time.perf_counter()
        for _ in range(args.steps):
            sampler.next_batch()
        first_pass = time.perf_counter() - start
        state = sampler.state_dict()
        want, _ = sampler.next_batch()
        cursor_s, got_cursor = timed_resume(stream, state, args.batch)
        replay_s, got_replay = timed_resume(stream, {k: v for k, v in state.items() if k != CURSOR_KEY}, args.batch)
    if not (torch.equal(got_cursor, want) and torch.equal(got_replay, want)):
        raise SystemExit("resumed batches differ from the uninterrupted one")
    tokens = args.steps * args.batch * args.seq
    text = (
        "## Streaming resume\n\n"
        f"`python bench/stream_resume.py --steps {args.steps} --batch {args.batch} --seq {args.seq} --files {args.files} "
        f"--copies {args.copies}`: {size / 2**20:.1f} MB of bundled news + Wikipedia text in {args.files} .txt files, "
        f"bundled teacher's tokenizer, resumed after {args.steps} micro-batches ({tokens:,} tokens). Time to the "
        "first batch after the resume, both giving the uninterrupted run's batch:\n\n"
        "| resume from | seconds |\n|---|---:|\n"
        f"| the stream cursor | {cursor_s:.2f} |\n| replay (checkpoints without a cursor) | {replay_s:.2f} |\n\n"
        f"Ratio replay / cursor: {replay_s / cursor_s:.1f}x (the first pass to that point took {first_pass:.1f} s).\n"
    )
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()

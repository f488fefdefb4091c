"""Tiny teacher / student folders for recipe tests: a small llama and a word-level tokenizer of the bundled corpus.

``make_teacher_dir(path)`` writes a 3-layer llama (hidden 64, vocab 512) plus a 512-word tokenizer
built from the bundled corpus (``shift`` gives a tokenizer with a different word order);
``make_student_dir(teacher_dir, path)`` cuts a student out of it with a hand-made prune map (layers 0
and 2, 48 of 64 hidden channels, one of two KV groups, 64 of 96 neurons) and saves it with its map.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from minidistill.adapters import get_adapter
from minidistill.models import load_tokenizer
from minidistill.prune.apply import apply_prune_map
from minidistill.prune.prune_map import LayerMap, PruneMap

VOCAB = 512


def tiny_tokenizer(vocab_size: int = VOCAB, *, shift: int = 0):
    """A word-level fast tokenizer over the most frequent words of the bundled corpus (plus <unk>, <s>, </s>)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from minidistill.data import bundled_corpus_path

    counts = Counter(bundled_corpus_path().read_text(encoding="utf-8", errors="ignore").lower().split())
    words = [w for w, _ in counts.most_common(vocab_size - 3 + shift)][shift:]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_teacher_dir(
    path: str | Path, *, seed: int = 0, tie: bool = False, max_positions: int = 256, tokenizer_shift: int = 0
) -> Path:
    path = Path(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=max_positions, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(shift=tokenizer_shift).save_pretrained(path)
    return path


def half_map(teacher) -> PruneMap:
    shape = get_adapter(teacher).shape(teacher.config)
    pmap = PruneMap.identity(shape, teacher={"source": "tiny", "shape": dict(shape)})
    pmap.kept_layers = [0, 2]
    pmap.kept_hidden = list(range(0, 64, 4)) + [i for i in range(64) if i % 4][:32]
    pmap.kept_hidden.sort()
    pmap.layers = [LayerMap([1], [2, 3], list(range(0, 96, 3)) + list(range(1, 96, 3))) for _ in range(2)]
    for lm in pmap.layers:
        lm.kept_neurons.sort()
    pmap.student_shape = {**shape, "num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    pmap.validate()
    return pmap


def make_student_dir(teacher_dir: str | Path, path: str | Path) -> Path:
    path = Path(path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    pmap = half_map(teacher)
    student = apply_prune_map(teacher, pmap)
    student.save_pretrained(path, safe_serialization=True)
    load_tokenizer(str(teacher_dir)).save_pretrained(path)
    pmap.save(path)
    return path


def tiny_overrides(run_root: str | Path, teacher_dir: str | Path, student_dir: str | Path, **extra) -> list[str]:
    """Command-line overrides of a quick recipe run on the tiny folders and a slice of the bundled corpus."""
    base = {
        "run_name": "tiny",
        "output_root": str(run_root),
        "teacher.source": str(teacher_dir),
        "student.source": str(student_dir),
        "data.source": "bundled",
        "data.max_documents": 40,
        "data.seq_len": 32,
        "train.batch_size": 4,
        "train.max_steps": 6,
        "train.lr": 3e-3,
        "train.warmup_steps": 1,
        "train.progress_bar": False,
        "eval.max_blocks": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]

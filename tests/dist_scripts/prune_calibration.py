"""Calibration statistics and a pruned student, in one process or split over ``accelerate launch`` processes.

Usage: ``[accelerate launch ...] prune_calibration.py OUT_DIR``. A seeded tiny llama (3 layers) and 10
seeded calibration blocks of 48 tokens; every rank passes its :class:`CalibrationShard` to

* ``compute_importance`` with activation importance, re-fit neuron ranking, layer statistics and the
  teacher-mode Gram matrices, and again with ``taylor`` importance;
* ``prune_model`` to an explicit shape (one layer dropped by the ``contiguous`` method, heads and
  neurons cut, teacher-mode re-fit from the calibration Grams), saving to ``OUT_DIR/student``.
* ``prune_model`` to a budget, once scoring by LM loss and once by KL (sensitivity, candidates and a
  short-distillation ranking, each rank scoring its share of the scoring batches), counting the decoder-layer
  rows the rank runs.

Rank 0 writes ``OUT_DIR/stats.safetensors`` (every importance tensor, layer statistic and Gram matrix);
every rank writes ``OUT_DIR/rank<r>.json`` (its prune map and the sha256 of its student's weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidistill.data import DataConfig, TextData, TokenBlocks
from minidistill.models import state_dict_sha256
from minidistill.prune.distributed import CalibrationShard
from minidistill.prune.importance import ImportanceConfig, compute_importance
from minidistill.prune.pipeline import PruneConfig, prune_model
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

VOCAB = 128


def tiny_teacher():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    shard = CalibrationShard.from_accelerator(accelerator)
    teacher = tiny_teacher()
    g = torch.Generator().manual_seed(7)
    calibration = torch.randint(3, VOCAB, (10, 48), generator=g)
    heldout = torch.randint(3, VOCAB, (2, 48), generator=g)

    tensors: dict[str, torch.Tensor] = {}
    grams: dict = {}
    units, sim = compute_importance(teacher, calibration, ImportanceConfig(cache=False), layer_stats=True,
                                    gram_out=grams, shard=shard)
    assert units.settings["neuron_ranking"] == "refit"
    for name, value in units.to_dict()["tensors"].items():
        tensors[f"activation.{name}"] = value
    tensors.update({f"similarity.{k}": v.double() for k, v in sim.to_tensors().items()})
    for part in ("o_proj", "down_proj"):
        for i, gram in enumerate(grams[part]):
            tensors[f"gram.{part}.{i}"] = gram.cpu()
    taylor, taylor_sim = compute_importance(teacher, calibration, ImportanceConfig(method="taylor", cache=False,
                                            neuron_ranking="method"), layer_stats=True, shard=shard)
    for name, value in taylor.to_dict()["tensors"].items():
        tensors[f"taylor.{name}"] = value
    tensors["taylor_similarity.layer_cos_sum"] = taylor_sim.cos_sum

    cfg = PruneConfig.from_dict({
        "importance": {"cache": False}, "layer_method": "contiguous", "calib_blocks": 10, "show_progress": False,
        "target": {"params": None, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "reconstruction": {"mode": "teacher"}, "output_dir": str(out / "student"), "overwrite": True,
    })
    data = TextData(TokenBlocks(calibration), TokenBlocks(heldout), DataConfig())
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")))
    result = prune_model(teacher, tokenizer, data, cfg, teacher_source="tiny", shard=shard)
    record = {"world": shard.world, "prune_map": result.prune_map.to_dict(),
              "student_sha256": state_dict_sha256(result.student), "saved": result.output_dir is not None}
    # A budget search (sensitivity, candidates, short-distillation ranking) for each score; the decoder-layer
    # rows this rank runs are counted.
    rows = {"n": 0}
    layer_forward = LlamaDecoderLayer.forward

    def counted(self, hidden_states, *args, **kwargs):
        rows["n"] += hidden_states.shape[0]
        return layer_forward(self, hidden_states, *args, **kwargs)

    LlamaDecoderLayer.forward = counted
    for score in ("loss", "kl"):
        search_cfg = PruneConfig.from_dict({
            "importance": {"cache": False}, "calib_blocks": 8, "show_progress": False, "target": {"params": 0.6},
            "search": {"score": score, "multiple_of": 8, "max_candidates": 3, "score_blocks": 2, "batch_size": 1,
                       "sensitivity": True, "distill_steps": 2, "distill_candidates": 2, "distill_batch_size": 2},
        })
        rows["n"] = 0
        searched = prune_model(teacher, tokenizer, data, search_cfg, teacher_source="tiny", shard=shard)
        record[f"search_{score}"] = {
            "prune_map": {k: v for k, v in searched.prune_map.to_dict().items() if k != "notes"},
            "candidates": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in searched.candidates],
            "layer_rows": rows["n"], "student_sha256": state_dict_sha256(searched.student),
        }
    LlamaDecoderLayer.forward = layer_forward
    (out / f"rank{shard.rank}.json").write_text(json.dumps(record, default=str))
    if shard.is_main:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "stats.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

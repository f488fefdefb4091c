"""Greedy generations from fixed prompts, for side-by-side comparison of teacher and students."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_PROMPTS = (
    "The capital of France is",
    "The prime minister said on Tuesday that",
    "Scientists have found that",
    "In the match against England, Australia",
)


@torch.no_grad()
def greedy_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: tuple[str, ...] | list[str] = DEFAULT_PROMPTS,
    *,
    max_new_tokens: int = 24,
) -> list[dict[str, str]]:
    """``[{"prompt", "completion"}]``: one batched greedy ``generate`` call with left padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]

"""Held-out perplexity of a causal LM over packed token blocks, without full-batch vocabulary logits.

Also: rolling-window perplexity of whole documents as lm-eval computes it (``rolling_perplexity``),
and greedy next-token predictions of a student and its teacher (``top1_predictions``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter


def iter_token_chunks(hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
    """Yield (hidden rows, labels) chunks of at most ``chunk_tokens`` flattened positions."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    for i in range(0, h.shape[0], chunk_tokens):
        yield h[i : i + chunk_tokens], y[i : i + chunk_tokens]


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean next-token NLL (nats), perplexity and token count over batches of ``input_ids``.

    Runs the backbone once per batch and projects hidden states to the vocabulary ``chunk_tokens``
    positions at a time, so at most ``chunk_tokens x vocab`` logits exist at once.
    """
    total, count = heldout_nll_sum(model, batches, chunk_tokens=chunk_tokens, device=device)
    if count == 0:
        raise ValueError("no tokens to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


@torch.no_grad()
def heldout_nll_sum(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """The summed next-token NLL (nats) and the token count over batches of ``input_ids`` (``(0.0, 0)`` for none);
    computed as :func:`heldout_loss` computes it, so that sums over shards of the batches add up to it."""
    adapter = get_adapter(model)
    backbone = model.get_submodule(adapter.backbone)
    head = model.get_submodule(adapter.lm_head)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids in batches:
        input_ids = input_ids.to(device)
        hidden = backbone(input_ids=input_ids).last_hidden_state[:, :-1]
        labels = input_ids[:, 1:]
        for h, y in iter_token_chunks(hidden, labels, chunk_tokens):
            logits = head(h).float()
            total += F.cross_entropy(logits, y, reduction="sum").item()
            count += y.numel()
    model.train(was_training)
    return total, count


# ---------------------------------------------------------------------------------------------
# Rolling-window perplexity over whole documents, matching lm-eval's ``loglikelihood_rolling``.
# ---------------------------------------------------------------------------------------------

_DEFAULT_MAX_LENGTH = 2048
_UNSET_MAX_LENGTH = 10**18


def model_max_length(model: nn.Module, tokenizer=None, default: int = _DEFAULT_MAX_LENGTH) -> int:
    """Context length as lm-eval's HFLM resolves it: config ``n_positions`` / ``max_position_embeddings``
    / ``n_ctx``, then the tokenizer's ``model_max_length`` (unless unset), then ``default``."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _UNSET_MAX_LENGTH:
        return tok_max
    return default


def encode_like_hflm(tokenizer, text: str, add_bos_token: bool | None = None, prefix_token_id: int | None = None) -> list[int]:
    """Token ids of ``text`` as lm-eval's HFLM encodes a rolling-loglikelihood document.

    The tokenizer's own special-token handling applies unless ``add_bos_token`` says otherwise, and
    none are added when the text already starts with the prefix token's string.
    """
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    prefix = prefix_token_id if prefix_token_id is not None else default_prefix_token_id(tokenizer)
    if add_bos_token is None and prefix is not None and text.startswith(tokenizer.decode(prefix)):
        kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def default_prefix_token_id(tokenizer) -> int | None:
    """The token that conditions a document's first token: BOS, else EOS (as in HFLM)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint scoring windows over ``tokens``: (model input, targets of its last ``len(targets)`` positions).

    Every token is predicted exactly once. The first window starts with ``prefix_token``; later
    windows carry as much preceding context as fits in ``max_length`` inputs.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        end = predicted + min(len(tokens) - predicted, max_length)
        windows.append((tokens[max(0, end - max_length - 1) : end - 1], tokens[predicted:end]))
        predicted = end
    return windows


def _project_logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # soft-capping that the causal-LM forward applies after the head
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def document_loglikelihoods(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    chunk_tokens: int = 2048,
    add_bos_token: bool | None = None,
    prefix_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> list[tuple[float, int]]:
    """Per-document (summed log-likelihood in nats, tokens scored) over rolling windows.

    Tokenization and windows follow lm-eval's HFLM ``loglikelihood_rolling``. Windows of all
    documents are batched (right-padded; the causal mask keeps padding out of scored positions),
    the backbone runs once per batch, and only scored positions are projected to the vocabulary,
    ``chunk_tokens`` rows at a time.
    """
    adapter = get_adapter(model)
    backbone = model.get_submodule(adapter.backbone)
    head = model.get_submodule(adapter.lm_head)
    device = device or next(model.parameters()).device
    max_length = max_length or model_max_length(model, tokenizer)
    prefix = prefix_token_id if prefix_token_id is not None else default_prefix_token_id(tokenizer)
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; pass prefix_token_id")
    windows: list[tuple[int, list[int], list[int]]] = []
    for doc_index, text in enumerate(texts):
        ids = encode_like_hflm(tokenizer, text, add_bos_token, prefix)
        windows.extend((doc_index, inp, tgt) for inp, tgt in rolling_windows(ids, prefix, max_length))
    totals = torch.zeros(len(texts), dtype=torch.float64)
    counts = [0] * len(texts)
    for doc_index, _, tgt in windows:
        counts[doc_index] += len(tgt)
    was_training = model.training
    model.eval()
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))  # similar lengths per batch
    for start in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[start : start + batch_size]]
        width = max(len(inp) for _, inp, _ in batch)
        input_ids = torch.full((len(batch), width), prefix, dtype=torch.long)
        rows, positions, targets, owners = [], [], [], []
        for row, (doc_index, inp, tgt) in enumerate(batch):
            input_ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            rows += [row] * len(tgt)
            positions += range(len(inp) - len(tgt), len(inp))
            targets += tgt
            owners += [doc_index] * len(tgt)
        hidden = backbone(input_ids=input_ids.to(device)).last_hidden_state
        selected = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(positions, device=hidden.device)]
        targets_t = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        owners_t = torch.tensor(owners, dtype=torch.long)
        for i in range(0, selected.shape[0], chunk_tokens):
            logits = _project_logits(model, head, selected[i : i + chunk_tokens])
            ll = -F.cross_entropy(logits, targets_t[i : i + chunk_tokens], reduction="none")
            totals.index_add_(0, owners_t[i : i + chunk_tokens], ll.double().cpu())
    model.train(was_training)
    return list(zip(totals.tolist(), counts))


def count_words(text: str) -> int:
    """Words as lm-eval counts them for ``word_perplexity`` (pieces between whitespace runs)."""
    return len(re.split(r"\s+", text))


def rolling_perplexity(model: nn.Module, tokenizer, texts: list[str], **kwargs) -> dict[str, float]:
    """Word / byte / token perplexity and bits per byte of whole documents (lm-eval's definitions).

    ``kwargs`` go to :func:`document_loglikelihoods`. Word perplexity is
    ``exp(-sum loglik / sum words)`` over all documents, as lm-eval aggregates it.
    """
    if not texts:
        raise ValueError("no documents to evaluate")
    per_doc = document_loglikelihoods(model, tokenizer, texts, **kwargs)
    loglik = sum(ll for ll, _ in per_doc)
    tokens = sum(n for _, n in per_doc)
    words = sum(count_words(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "word_perplexity": math.exp(-loglik / words),
        "byte_perplexity": math.exp(-loglik / n_bytes),
        "bits_per_byte": -loglik / n_bytes / math.log(2),
        "token_perplexity": math.exp(-loglik / tokens),
        "loglikelihood": loglik,
        "words": words,
        "bytes": n_bytes,
        "tokens": tokens,
        "documents": len(texts),
    }


@torch.no_grad()
def top1_predictions(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    chunk_tokens: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy next-token predictions of student and teacher on the same inputs (flat LongTensors).

    Each model's backbone runs once per batch; vocabulary logits exist ``chunk_tokens`` rows at a time.
    """
    batches = list(batches)
    preds: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        adapter = get_adapter(model)
        backbone = model.get_submodule(adapter.backbone)
        head = model.get_submodule(adapter.lm_head)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for input_ids in batches:
            hidden = backbone(input_ids=input_ids.to(device)).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            for i in range(0, flat.shape[0], chunk_tokens):
                preds[name].append(_project_logits(model, head, flat[i : i + chunk_tokens]).argmax(-1).cpu())
        model.train(was_training)
    if not preds["student"]:
        raise ValueError("no tokens to compare")
    return torch.cat(preds["student"]), torch.cat(preds["teacher"])

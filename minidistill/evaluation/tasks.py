"""Local lm-eval tasks over the project's own held-out documents, generated at run time.

lm-eval needs absolute ``data_files`` paths, so the task YAMLs and their JSONL data are written into
a folder (a run folder, or the cache) and that folder is given to ``TaskManager(include_path=...)``:

* ``minidistill_heldout_ppl``: rolling log-likelihood of every held-out document
  (``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``).
* ``minidistill_lastword``: LAMBADA-style last-word prediction built deterministically from held-out
  sentences (``acc`` = the target word is the greedy continuation, ``perplexity``), capped in size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from ..data import DataConfig, load_documents, split_documents
from ..models import cache_root

LOCAL_PREFIX = "minidistill_"
HELDOUT_PPL_TASK = "minidistill_heldout_ppl"
LASTWORD_TASK = "minidistill_lastword"
LOCAL_TASKS = (HELDOUT_PPL_TASK, LASTWORD_TASK)
TASK_FORMAT_VERSION = 1

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")


def lastword_items(
    texts: list[str], *, max_items: int = 100, per_document: int = 3, min_words: int = 6, context_words: int = 64
) -> list[dict]:
    """Last-word prediction items from whole sentences, in document order (at most ``per_document`` each).

    For each sentence of at least ``min_words`` words whose last word is alphabetic (after its
    closing punctuation is removed), the context is up to ``context_words`` preceding words of the
    document plus the sentence without its last word, and the target is ``" " + last word``.
    """
    items: list[dict] = []
    for text in texts:
        preceding: list[str] = []
        taken = 0
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            words = sentence.rstrip(".!?\"')").split(" ")
            if taken < per_document and len(words) >= min_words and _WORD.match(words[-1]):
                context = preceding[-context_words:] + words[:-1]
                items.append({"context": " ".join(context), "target": " " + words[-1]})
                taken += 1
                if len(items) >= max_items:
                    return items
            preceding += sentence.split(" ")
    return items


def _task_yamls(folder: Path, has_fewshot: bool) -> dict[str, dict]:
    heldout = {
        "task": HELDOUT_PPL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "heldout.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "num_fewshot": 0,  # whole-document perplexity: lm-eval leaves a 0 set here unchanged by --num_fewshot
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": TASK_FORMAT_VERSION},
    }
    lastword_files = {"test": str(folder / "lastword.jsonl")}
    lastword = {
        "task": LASTWORD_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": lastword_files},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": TASK_FORMAT_VERSION},
    }
    if has_fewshot:
        lastword_files["train"] = str(folder / "lastword_fewshot.jsonl")
        lastword["training_split"] = "train"
        lastword["fewshot_split"] = "train"
        lastword["fewshot_delimiter"] = "\n\n"
    return {HELDOUT_PPL_TASK: heldout, LASTWORD_TASK: lastword}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_local_tasks(
    folder: str | Path,
    heldout_texts: list[str],
    *,
    fewshot_texts: list[str] | None = None,
    max_lastword_items: int = 100,
) -> Path:
    """Write the local task YAMLs and their JSONL data into ``folder`` (replaced whole); returns it.

    ``fewshot_texts`` (training documents) supply few-shot examples for the last-word task.
    """
    if not heldout_texts:
        raise ValueError("no held-out documents to build the local lm-eval tasks from")
    items = lastword_items(heldout_texts, max_items=max_lastword_items)
    if not items:
        raise ValueError(
            "the held-out documents hold no sentence usable for minidistill_lastword "
            "(need sentences of at least 6 words ending in an alphabetic word)"
        )
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_jsonl(tmp / "heldout.jsonl", [{"text": t} for t in heldout_texts])
        _write_jsonl(tmp / "lastword.jsonl", items)
        fewshot = lastword_items(fewshot_texts, max_items=max_lastword_items) if fewshot_texts else []
        if fewshot:
            _write_jsonl(tmp / "lastword_fewshot.jsonl", fewshot)
        for name, spec in _task_yamls(folder, bool(fewshot)).items():
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def heldout_texts(data_cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(held-out documents, training documents) of the data config's deterministic split."""
    splits = split_documents(load_documents(data_cfg), data_cfg)
    return list(splits["heldout"]["text"]), list(splits["train"]["text"])


def prepare_local_tasks(
    data_cfg: DataConfig | None = None,
    folder: str | Path | None = None,
    *,
    max_lastword_items: int = 100,
) -> Path:
    """Generate the local tasks for ``data_cfg``'s held-out split; returns the folder for ``include_path``.

    Without ``folder`` the tasks go to the cache, keyed by the documents' hash, and are reused.
    """
    data_cfg = data_cfg or DataConfig()
    heldout, train = heldout_texts(data_cfg)
    fewshot = train[:50]
    key = hashlib.sha256(
        json.dumps([TASK_FORMAT_VERSION, max_lastword_items, heldout, fewshot]).encode()
    ).hexdigest()[:16]
    if folder is None:
        folder = cache_root() / "lm_eval_tasks" / key
        if (folder / f"{LASTWORD_TASK}.yaml").is_file():
            return folder
    return write_local_tasks(folder, heldout, fewshot_texts=fewshot, max_lastword_items=max_lastword_items)

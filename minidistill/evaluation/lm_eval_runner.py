"""Score several models (teacher, pruned, distilled, ...) on the same lm-eval tasks, side by side.

Models are evaluated in memory through lm-eval's ``HFLM`` (or loaded from a saved folder). The
project's local tasks (see :mod:`minidistill.evaluation.tasks`) run offline on the held-out split;
any other name is handed to lm-eval's ``TaskManager`` as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import count_parameters
from ..cli import doc_of
from ..config import ConfigBase, ConfigError
from ..data import DataConfig, TextData, check_data_source
from ..models import ModelConfig, load_model_and_tokenizer, resolve_source
from .tasks import LOCAL_PREFIX, LOCAL_TASKS, prepare_local_tasks

logger = logging.getLogger(__name__)

ModelEntry = tuple[PreTrainedModel, PreTrainedTokenizerBase] | str | Path


@dataclass
class LmEvalConfig(ConfigBase):
    """Which lm-eval tasks to run and how."""

    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS))
    """Task names: the local ``minidistill_heldout_ppl`` / ``minidistill_lastword``, or any lm-eval task (needs its data)."""
    num_fewshot: int | None = None
    """Few-shot examples per item (None: each task's default)."""
    limit: int | float | None = None
    """Items per task: an int caps the count, a float in (0, 1] takes that fraction; None for all."""
    batch_size: int = 8
    """Requests per forward pass."""
    device: str | None = None
    """Device the models are moved to while scored (None: where they are)."""
    output_dir: str | None = None
    """Folder for ``lm_eval.md`` / ``lm_eval.json`` and the generated local tasks (None: not saved; tasks in the cache)."""
    max_length: int | None = None
    """Context length for rolling windows (None: the model's ``max_position_embeddings``)."""
    max_lastword_items: int = 100
    """Items of the local last-word task (kept small so it stays quick on CPU)."""
    include_path: str | None = None
    """Extra folder of lm-eval task YAMLs (your own tasks), searched besides the built-in ones."""

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("lm_eval.tasks is empty: name at least one task (e.g. minidistill_heldout_ppl)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"lm_eval.num_fewshot={self.num_fewshot}: must be >= 0")
        if self.limit is not None:
            if isinstance(self.limit, float) and not 0.0 < self.limit <= 1.0:
                raise ConfigError(f"lm_eval.limit={self.limit}: a fraction must be in (0, 1]")
            if isinstance(self.limit, int) and self.limit < 1:
                raise ConfigError(f"lm_eval.limit={self.limit}: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"lm_eval.batch_size={self.batch_size}: must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"lm_eval.max_length={self.max_length}: must be >= 2")
        if self.max_lastword_items < 1:
            raise ConfigError(f"lm_eval.max_lastword_items={self.max_lastword_items}: must be >= 1")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ConfigError(f"lm_eval.include_path={self.include_path!r} is not a folder")


@dataclass
class EvalRow:
    """One model's scores: ``metrics[task][metric]`` plus size and wall time."""

    name: str
    parameters: int
    non_embedding_parameters: int
    wall_time_s: float
    metrics: dict[str, dict[str, float]]
    samples: dict[str, int] = field(default_factory=dict)


@dataclass
class EvalTable:
    """Side-by-side lm-eval results of several models on the same tasks."""

    rows: list[EvalRow]
    tasks: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    """``num_fewshot``, ``limit``, ``batch_size`` and ``versions`` (lm-eval's version of each task)."""

    def row(self, name: str) -> EvalRow:
        """The row of the model called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no model {name!r} in the table; models are {[r.name for r in self.rows]}")

    def columns(self) -> list[tuple[str, str]]:
        """(task, metric) pairs in first-seen order."""
        seen: list[tuple[str, str]] = []
        for r in self.rows:
            for task in self.tasks:
                for metric in r.metrics.get(task, {}):
                    if (task, metric) not in seen:
                        seen.append((task, metric))
        return seen

    def to_markdown(self) -> str:
        """A markdown table: one row per model, one column per task metric."""
        cols = self.columns()
        header = ["model", "params", "non-emb params", "wall s"] + [f"{t} {m}" for t, m in cols]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.rows:
            cells = [r.name, _human(r.parameters), _human(r.non_embedding_parameters), f"{r.wall_time_s:.1f}"]
            cells += [_fmt(r.metrics.get(t, {}).get(m)) for t, m in cols]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Plain dict: ``{"tasks", "settings", "rows": [...]}``."""
        return {"tasks": list(self.tasks), "settings": dict(self.settings), "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalTable:
        """Inverse of :meth:`to_json`."""
        return cls(rows=[EvalRow(**r) for r in data["rows"]], tasks=list(data["tasks"]), settings=dict(data.get("settings", {})))

    def save(self, folder: str | Path) -> Path:
        """Write ``lm_eval.md`` and ``lm_eval.json`` into ``folder`` (each written whole, then renamed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "lm_eval.md", self.to_markdown())
        _atomic_write(folder / "lm_eval.json", json.dumps(self.to_json(), indent=2) + "\n")
        return folder


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3e}"


def _task_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """``{"task": {"word_perplexity": x}}`` from simple_evaluate's ``results`` (filter suffix dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            if "_stderr" in key or key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
        out[task] = metrics
    return out


def _raise_unknown(names: list[str], known) -> None:
    import difflib

    hints = {n: difflib.get_close_matches(n, sorted(set(known) | set(LOCAL_TASKS)), n=3) for n in names}
    detail = "; ".join(f"{n!r} (did you mean {', '.join(h)}?)" if h else repr(n) for n, h in hints.items())
    raise ConfigError(
        f"lm_eval.tasks: unknown task {detail}. Use {list(LOCAL_TASKS)}, an lm-eval task name, "
        "or put your own task YAMLs in lm_eval.include_path"
    )


def _task_manager_for(other: list[str], include_paths: list[str]):
    """A TaskManager that knows every task in ``other``; lm-eval's built-in tasks are indexed only
    when a name is not found in ``include_paths``. Unknown names raise before any evaluation."""
    from lm_eval.tasks import TaskManager

    def missing(tm) -> list[str]:
        known = set(tm.all_tasks)
        return [n for n in other if n not in known and not tm.match_tasks([n]) and not Path(n).is_file()]

    tm = TaskManager(include_path=include_paths or None, include_defaults=False)
    if other and missing(tm):
        tm = TaskManager(include_path=include_paths or None, include_defaults=True)
        unknown = missing(tm)
        if unknown:
            _raise_unknown(unknown, tm.all_tasks)
    return tm


def _resolve_entry(entry: ModelEntry) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(entry, (str, Path)):
        folder = Path(entry)
        resolve_source(str(folder))  # ModelError naming the folder when it is missing or holds no config.json
        return load_model_and_tokenizer(ModelConfig(source=str(folder)))
    if not (isinstance(entry, tuple) and len(entry) == 2):
        raise TypeError("each model must be a (model, tokenizer) pair or a saved model folder")
    return entry


def run_lm_eval(
    models: dict[str, ModelEntry],
    cfg: LmEvalConfig,
    *,
    data: TextData | None = None,
    data_config: DataConfig | None = None,
    task_dir: str | Path | None = None,
) -> EvalTable:
    """Score every model on ``cfg.tasks`` and return the side-by-side table (saved when ``cfg.output_dir``).

    The local tasks are built from the held-out split of ``data_config`` (else ``data.config``, else
    the bundled corpus), or read from ``task_dir`` when given. Other task names go to lm-eval's
    ``TaskManager`` unchanged (unknown ones raise before anything is scored). Call it on the main
    process only: each model is scored whole on this process.
    """
    cfg.validate()
    if not models:
        raise ValueError("run_lm_eval needs at least one model")
    reserved = [t for t in cfg.tasks if t.startswith(LOCAL_PREFIX) and t not in LOCAL_TASKS]
    if reserved:  # our own namespace: no need to index lm-eval's tasks to know these are wrong
        _raise_unknown(reserved, LOCAL_TASKS)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    local = [t for t in cfg.tasks if t in LOCAL_TASKS]
    include_paths = [str(Path(cfg.include_path).resolve())] if cfg.include_path else []
    if local:
        if task_dir is None:
            data_cfg = data_config or (data.config if data is not None else DataConfig())
            target = Path(cfg.output_dir) / "lm_eval_tasks" if cfg.output_dir else None
            task_dir = prepare_local_tasks(data_cfg, target, max_lastword_items=cfg.max_lastword_items)
        include_paths.append(str(Path(task_dir).resolve()))
    task_manager = _task_manager_for([t for t in cfg.tasks if t not in LOCAL_TASKS], include_paths)
    rows = []
    versions: dict[str, Any] = {}
    for name, entry in models.items():
        model, tokenizer = _resolve_entry(entry)
        original_device = next(model.parameters()).device
        if cfg.device is not None:
            model.to(cfg.device)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
            out = simple_evaluate(
                model=lm,
                tasks=list(cfg.tasks),
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                bootstrap_iters=0,
                task_manager=task_manager,
                log_samples=False,
            )
        finally:
            model.train(was_training)
            if cfg.device is not None:
                model.to(original_device)
        wall = time.perf_counter() - start
        if out is None:
            raise RuntimeError("lm-eval returned no results (non-zero rank?)")
        versions.update({str(task): v for task, v in (out.get("versions") or {}).items()})
        rows.append(
            EvalRow(
                name=name,
                parameters=count_parameters(model),
                non_embedding_parameters=count_parameters(model, non_embedding=True),
                wall_time_s=wall,
                metrics=_task_metrics(out["results"], cfg.tasks),
                samples={t: int(v.get("effective", v.get("original", 0))) for t, v in out.get("n-samples", {}).items()},
            )
        )
        logger.info("lm-eval %s: %s (%.1f s)", name, rows[-1].metrics, wall)
    table = EvalTable(
        rows=rows,
        tasks=list(cfg.tasks),
        settings={"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "batch_size": cfg.batch_size,
                  "versions": versions},
    )
    if cfg.output_dir:
        table.save(cfg.output_dir)
    return table


__all__ = ["EvalRow", "EvalTable", "LmEvalConfig", "run_lm_eval"]


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--model NAME=FOLDER`` (repeatable; ``bundled`` for the bundled teacher) plus lm-eval options."""
    import argparse

    parser = argparse.ArgumentParser(description="Score models side by side on lm-eval tasks (offline local tasks by default).")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE",
                        help="a model to score: a saved folder or 'bundled' (repeat for several)")
    parser.add_argument("--tasks", default=",".join(LOCAL_TASKS),
                        help=doc_of(LmEvalConfig, "tasks", " Comma-separated."))
    parser.add_argument("--num_fewshot", type=int, default=None, help=doc_of(LmEvalConfig, "num_fewshot"))
    parser.add_argument("--limit", type=float, default=None,
                        help=doc_of(LmEvalConfig, "limit", " Here a value >= 1 is a count."))
    parser.add_argument("--batch_size", type=int, default=8, help=doc_of(LmEvalConfig, "batch_size"))
    parser.add_argument("--device", default=None, help=doc_of(LmEvalConfig, "device"))
    parser.add_argument("--output_dir", default=None, help=doc_of(LmEvalConfig, "output_dir"))
    parser.add_argument("--data_source", default="bundled",
                        help="corpus whose held-out split feeds the local tasks: " + doc_of(DataConfig, "source"))
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    cfg = LmEvalConfig(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
        device=args.device,
        output_dir=args.output_dir,
    )
    models: dict[str, ModelEntry] = {}
    for spec in args.model:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            parser.error(f"--model {spec!r}: expected NAME=SOURCE")
        if source != "bundled":
            resolve_source(source)  # every model folder is checked before the first one is scored
        models[name] = source
    cfg.validate()
    data_config = DataConfig(source=args.data_source)
    check_data_source(data_config)
    if args.output_dir:
        from ..prune.pipeline import check_writable

        check_writable(args.output_dir)
    models = {n: load_model_and_tokenizer(ModelConfig(source=s)) if s == "bundled" else s for n, s in models.items()}
    table = run_lm_eval(models, cfg, data_config=data_config)
    print(table.to_markdown())
    return 0

"""Model card (README.md with YAML metadata) for a pruned and distilled model.

``build_model_card(run_info)`` reads these keys of ``run_info`` (all optional unless noted):

- ``model_name`` (str): name shown in the card and in ``model-index`` (default: the folder name or
  ``"minidistill-student"``).
- ``teacher`` (dict, required): ``source`` (Hub id, local folder or ``bundled``), ``license``
  (overrides what is found in the teacher's README), ``shape`` (prunable shape dict),
  ``parameters`` (int).
- ``student`` (dict): ``shape`` and ``parameters`` after pruning.
- ``prune_map`` (dict): the ``prune_map.json`` contents (or ``PruneMap.to_dict()``); summarised.
- ``losses`` (dict): loss name -> weight.
- ``tokens_seen`` (int): distillation tokens.
- ``hardware`` (str): e.g. ``"1x CPU (2 cores)"``.
- ``datasets`` (list[str]): training / calibration data sources.
- ``before_after`` (list[dict]): rows of the before/after table (same keys in every row), or a
  markdown string.
- ``eval_results`` (dict): an ``EvalTable.to_json()`` (``lm_eval.json``); ``eval_model`` names its
  row that becomes the card's ``model-index`` (default ``"distilled"``, else the last row). Only the
  metrics that were run are listed; each result's ``dataset.args`` holds the lm-eval task version
  (``settings["versions"][task]`` when recorded), ``num_fewshot`` and ``limit``.
- ``speed`` (dict): model name -> :func:`minidistill.publish.report.measure_speed` result (teacher and
  student measured on the same machine in the same run); read from the run's ``metrics.json`` by
  :func:`run_info_from_folder`.
- ``reproduce`` (str): the command that reproduces the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

BUNDLED_TEACHER = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
UNKNOWN_LICENSE_NOTE = (
    "The teacher's license could not be determined (no license in its model card); the license is set "
    "to `other`. Check the teacher's terms before redistributing this model."
)


def teacher_metadata(source: str, license_override: str | None = None) -> dict[str, Any]:
    """``base_model`` and ``license`` of a teacher: from its README metadata when it is a local folder.

    ``license`` is ``None`` when it cannot be determined.
    """
    if source == "bundled":
        meta = dict(BUNDLED_TEACHER)
    else:
        meta = {"base_model": source, "license": None}
        readme = Path(source) / "README.md"
        if readme.is_file():
            try:
                data = ModelCard.load(readme).data
            except (ValueError, yaml.YAMLError) as err:
                logger.warning("could not parse the teacher's model card %s: %s", readme, err)
            else:
                meta["license"] = data.license
                base = data.base_model
                if Path(source).exists() and isinstance(base, str):
                    meta["base_model"] = base  # a local copy: name what it was copied from
        if Path(source).exists() and meta["base_model"] == source:
            meta["base_model"] = None  # a local path is no Hub id
    if license_override:
        meta["license"] = license_override
    return meta


def _eval_results(eval_json: dict[str, Any], row_name: str | None, dataset: str) -> tuple[list[EvalResult], str | None]:
    rows = eval_json.get("rows", [])
    if not rows:
        return [], None
    names = [r["name"] for r in rows]
    name = row_name if row_name in names else ("distilled" if "distilled" in names else names[-1])
    row = rows[names.index(name)]
    settings = eval_json.get("settings") or {}
    versions = settings.get("versions") or {}
    results = []
    for task, metrics in row["metrics"].items():
        args = {"lm_eval_task_version": versions.get(task), "num_fewshot": settings.get("num_fewshot"),
                "limit": settings.get("limit")}
        args = {k: v for k, v in args.items() if v is not None} or None
        for metric, value in metrics.items():
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=task,
                    dataset_name=f"{task} ({dataset})" if task.startswith("minidistill_") else task,
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=float(value),
                    dataset_args=args,
                    source_name="lm-evaluation-harness",
                    source_url="https://github.com/EleutherAI/lm-evaluation-harness",
                )
            )
    return results, name


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _shape_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = list(dict.fromkeys([*before, *after]))
    return _markdown_table([{"": k, "teacher": before.get(k, "-"), "student": after.get(k, "-")} for k in keys])


def _prune_map_summary(pm: dict[str, Any]) -> str:
    lines = []
    layers = pm.get("kept_layers")
    teacher_layers = pm.get("teacher", {}).get("shape", {}).get("num_layers")
    if layers is not None:
        dropped = sorted(set(range(teacher_layers)) - set(layers)) if teacher_layers else None
        lines.append(f"- kept layers ({len(layers)}): {layers}" + (f"; dropped: {dropped}" if dropped else ""))
    if pm.get("kept_hidden") is not None:
        lines.append(f"- hidden channels kept: {len(pm['kept_hidden'])}")
    per_layer = pm.get("layers") or []
    if per_layer:
        kv = [len(layer["kept_kv_groups"]) for layer in per_layer]
        q = [len(layer["kept_query_heads"]) for layer in per_layer]
        n = [len(layer["kept_neurons"]) for layer in per_layer]
        lines.append(f"- KV groups kept per layer: {kv}")
        lines.append(f"- query heads kept per layer: {q}")
        lines.append(f"- MLP neurons kept per layer: {n}")
    if pm.get("refit"):
        lines.append(f"- re-fitted parameters: {len(pm['refit'])}")
    if pm.get("importance"):
        lines.append("- importance: " + ", ".join(f"{k}={v}" for k, v in pm["importance"].items()))
    return "\n".join(lines)


def build_model_card(run_info: dict[str, Any]) -> ModelCard:
    """A model card with YAML metadata (base model, license, tags, datasets, model-index) and a body
    describing the pruning, the distillation and the results. See the module docstring for keys."""
    teacher = run_info.get("teacher")
    if not isinstance(teacher, dict) or not teacher.get("source"):
        raise ValueError("run_info['teacher']['source'] is required (the teacher's Hub id, folder or 'bundled')")
    meta = teacher_metadata(teacher["source"], teacher.get("license"))
    license_ = meta["license"] or "other"
    model_name = run_info.get("model_name") or "minidistill-student"
    datasets = list(run_info.get("datasets") or [])
    eval_results, eval_row = _eval_results(run_info.get("eval_results") or {}, run_info.get("eval_model"), ", ".join(datasets) or "held-out split")
    data = ModelCardData(
        base_model=meta["base_model"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pruned", "distilled", "minidistill"],
        datasets=datasets or None,
        license=license_,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    if license_ == "other":
        data.license_name = "teacher-license-unknown"

    parts = [f"# {model_name}", ""]
    base = meta["base_model"] or teacher["source"]
    parts += [
        f"A smaller model pruned from **{base}** (depth and width, by importance on calibration data) and "
        "distilled against it with minidistill. It loads with "
        "`AutoModelForCausalLM.from_pretrained`.",
        "",
    ]
    if license_ == "other":
        parts += [f"> {UNKNOWN_LICENSE_NOTE}", ""]
    student = run_info.get("student") or {}
    if teacher.get("shape") or student.get("shape"):
        parts += ["## Shape before and after pruning", "", _shape_table(teacher.get("shape") or {}, student.get("shape") or {}), ""]
    if teacher.get("parameters") or student.get("parameters"):
        parts += [f"Parameters: {_count(teacher.get('parameters'))} (teacher) -> {_count(student.get('parameters'))} (student)", ""]
    if run_info.get("prune_map"):
        parts += ["## Prune map", "", _prune_map_summary(run_info["prune_map"]), ""]
    training = []
    if run_info.get("losses"):
        training += ["Losses and weights:", "", _markdown_table([{"loss": k, "weight": v} for k, v in run_info["losses"].items()]), ""]
    if run_info.get("tokens_seen") is not None:
        training += [f"- tokens seen: {int(run_info['tokens_seen']):,}"]
    if run_info.get("hardware"):
        training += [f"- hardware: {run_info['hardware']}"]
    if datasets:
        training += [f"- data: {', '.join(datasets)}"]
    if training:
        parts += ["## Distillation", "", *training, ""]
    before_after = run_info.get("before_after")
    if before_after:
        table = before_after if isinstance(before_after, str) else _markdown_table(before_after)
        parts += ["## Before and after", "", table.strip(), ""]
    if run_info.get("speed"):
        parts += ["## Speed", "", _speed_table(run_info["speed"]), ""]
    if (run_info.get("eval_results") or {}).get("rows"):
        from ..evaluation.lm_eval_runner import EvalTable

        parts += ["## lm-eval results", "", EvalTable.from_json(run_info["eval_results"]).to_markdown().strip(), ""]
        parts += [f"The `model-index` metadata holds the `{eval_row}` row.", ""]
    if run_info.get("reproduce"):
        parts += ["## Reproduce", "", "```bash", run_info["reproduce"], "```", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts)
    return ModelCard(content)


def _speed_table(speed: dict[str, dict[str, Any]]) -> str:
    from .report import speed_note

    ref = speed.get("teacher") or {}
    rows = []
    for name, sp in speed.items():
        row = {"model": name}
        for key, label, digits in (("forward_tokens_per_s", "forward tokens/s", 0), ("generate_tokens_per_s", "greedy generation tokens/s", 1)):
            value = sp.get(key)
            row[label] = "-" if value is None else f"{value:.{digits}f}"
            row[f"{label} x teacher"] = f"{value / ref[key]:.2f}x" if value and ref.get(key) and name != "teacher" else "-"
        rows.append(row)
    return _markdown_table(rows) + "\n\n" + speed_note(next(iter(speed.values())))


RUN_INFO_FILENAME = "run_info.json"


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


def run_info_from_folder(folder: str | Path, *, teacher_source: str | None = None, model_name: str | None = None) -> dict[str, Any]:
    """``run_info`` for :func:`build_model_card` from what a run saved: ``run_info.json``,
    ``prune_map.json``, ``metrics.json`` (speed) and ``lm_eval.json`` (in the folder or its parent, or
    the parent's ``lm_eval/``)."""
    import json

    folder = Path(folder)
    info: dict[str, Any] = {}
    path = _find(folder, RUN_INFO_FILENAME)
    if path:
        info = json.loads(path.read_text())
    pm_path = _find(folder, "prune_map.json")
    if pm_path and "prune_map" not in info:
        pm = json.loads(pm_path.read_text())
        info["prune_map"] = pm
        teacher = info.setdefault("teacher", {})
        teacher.setdefault("source", pm.get("teacher", {}).get("source"))
        teacher.setdefault("shape", pm.get("teacher", {}).get("shape"))
        info.setdefault("student", {}).setdefault("shape", pm.get("student_shape"))
    metrics_path = _find(folder, "metrics.json")  # the run report's numbers (report=true)
    if metrics_path and "speed" not in info:
        models = json.loads(metrics_path.read_text()).get("models") or {}
        speed = {name: m["speed"] for name, m in models.items() if isinstance(m, dict) and m.get("speed")}
        if speed:
            info["speed"] = speed
    # the recipe saves its lm-eval table under <run_dir>/lm_eval/; eval/run_lm_eval.py under --output_dir
    ev_path = _find(folder, "lm_eval.json") or _find(folder.parent / "lm_eval", "lm_eval.json")
    if ev_path and "eval_results" not in info:
        info["eval_results"] = json.loads(ev_path.read_text())
    if teacher_source:
        info.setdefault("teacher", {})["source"] = teacher_source
    if not info.get("teacher", {}).get("source"):
        raise ValueError(
            f"{folder} does not record its teacher (no run_info.json / prune_map.json): pass --teacher SOURCE"
        )
    if model_name:
        info["model_name"] = model_name
    return info

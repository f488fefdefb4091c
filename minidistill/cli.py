"""The ``minidistill`` command: ``prune``, ``distill``, ``eval``, ``push`` and ``export-gguf``.

    minidistill prune --model bundled --output runs/pruned --target_params 0.5
    accelerate launch -m minidistill.cli distill --config recipes/configs/demo.yaml
    minidistill eval --model teacher=bundled --model distilled=runs/demo/model
    minidistill push runs/demo/model --repo_id you/name
    minidistill export-gguf runs/demo --outtype q8_0

Each command is the code behind its script (``recipes/prune.py``, ``recipes/prune_distill.py``,
``eval/run_lm_eval.py``, ``recipes/push.py``, ``recipes/export_gguf.py``), which only call in here.
Option help and the list of ``key=value`` overrides come from the typed configs' field docstrings.
Bad input prints one ``error [<kind>, exit <code>]: ...`` line (:func:`minidistill.errors.run_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .config import ConfigBase, ConfigError, field_docs
from .errors import format_error, run_cli
from .prune.prune_map import PRUNABLE_SHAPE_KEYS

logger = logging.getLogger(__name__)

_FORMATTER = argparse.RawDescriptionHelpFormatter


# ------------------------------------------------------------------ help from the config dataclasses
def _config_class(tp: Any) -> type | None:
    """The config dataclass inside ``tp`` (``X``, ``X | None``), None for a plain value type."""
    if get_origin(tp) in (Union, types.UnionType):
        found = [c for c in map(_config_class, get_args(tp)) if c is not None]
        return found[0] if found else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase) else None


def _text(doc: str) -> str:
    return doc.replace("``", "`")


def doc_of(cls: type, name: str, extra: str = "") -> str:
    """Option help: the docstring of ``cls.name`` (``%`` escaped for argparse), plus ``extra``."""
    text = _text(field_docs(cls).get(name, "")) + extra
    return text.replace("%", "%%")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown(value: Any) -> str:
    if isinstance(value, ConfigBase):
        return "{...}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def config_reference(cls: type, prefix: str = "", width: int = 100) -> list[str]:
    """Every key of a config dataclass, nested sections as dotted keys: ``key = default`` and its docstring."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = _config_class(hints[f.name])
        entries = cls.entry_classes(f.name) if hasattr(cls, "entry_classes") else {}
        default = "{...}" if entries else _default(f)
        choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
        head = f"  {key}" + ("" if nested and default is not None else f" = {_shown(default)}")
        if choices:
            head += f"  ({' | '.join(map(str, choices))})"
        lines.append(head)
        if docs.get(f.name):
            lines += textwrap.wrap(_text(docs[f.name]), width, initial_indent="      ", subsequent_indent="      ")
        if nested:
            lines += config_reference(nested, f"{key}.", width)
        for name, entry in entries.items():
            lines += config_reference(entry, f"{key}.{name}.", width)
    return lines


def _epilog(title: str, cls: type, prefix: str = "") -> str:
    return f"{title}\n" + "\n".join(config_reference(cls, prefix))


# ------------------------------------------------------------------ prune
PRUNE_DESCRIPTION = """\
Prune a causal LM to a parameter budget or a shape.

Shape targets: --num_layers --hidden_size --num_heads --num_kv_heads --intermediate_size (unset
dimensions are kept). Any other PruneConfig key can be set with key=value overrides after the
options, e.g. search.score=kl importance.batch_agg=mean. The output folder holds the student
(safetensors, loadable with AutoModelForCausalLM.from_pretrained), its tokenizer, prune_map.json,
prune_config.json and prune_summary.json."""

SHAPE_OPTIONS = PRUNABLE_SHAPE_KEYS


def prune_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Options of ``minidistill prune`` / ``recipes/prune.py``."""
    from .data import DataConfig
    from .models import ModelConfig
    from .prune.importance import ImportanceConfig
    from .prune.pipeline import PruneConfig, SearchConfig
    from .prune.reconstruct import ReconstructionConfig
    from .prune.targets import TargetConfig

    p = argparse.ArgumentParser(prog=prog, description=PRUNE_DESCRIPTION, formatter_class=_FORMATTER,
                                epilog=_epilog("key=value overrides (PruneConfig):", PruneConfig))
    p.add_argument("--model", default="bundled", help="teacher: " + doc_of(ModelConfig, "source"))
    p.add_argument("--output", required=True, help="folder for the pruned student (refused if not empty)")
    p.add_argument("--target_params", type=float, help=doc_of(TargetConfig, "params"))
    for name in SHAPE_OPTIONS:
        p.add_argument(f"--{name}", type=int, help=doc_of(TargetConfig, name))
    p.add_argument("--non_embedding", action="store_true", help=doc_of(TargetConfig, "non_embedding"))
    p.add_argument("--importance", choices=("activation", "magnitude", "taylor", "random"), default="activation",
                   help=doc_of(ImportanceConfig, "method"))
    p.add_argument("--layer_method", default=None, metavar="METHOD", help=doc_of(PruneConfig, "layer_method"))
    p.add_argument("--no_reconstruction", action="store_true",
                   help="skip the re-fit (reconstruction.enabled=false): " + doc_of(ReconstructionConfig, "enabled"))
    p.add_argument("--calib_data", default="bundled", help=doc_of(DataConfig, "source"))
    p.add_argument("--text_column", default="text", help=doc_of(DataConfig, "text_column"))
    p.add_argument("--max_documents", type=int, default=None, help=doc_of(DataConfig, "max_documents"))
    p.add_argument("--tokenizer", default=None, help=doc_of(ModelConfig, "tokenizer"))
    p.add_argument("--trust_remote_code", action="store_true", help=doc_of(ModelConfig, "trust_remote_code"))
    p.add_argument("--overwrite", action="store_true", help=doc_of(PruneConfig, "overwrite"))
    p.add_argument("--seq_len", type=int, default=256, help=doc_of(DataConfig, "seq_len"))
    p.add_argument("--calib_blocks", type=int, default=64, help=doc_of(PruneConfig, "calib_blocks"))
    p.add_argument("--max_candidates", type=int, default=None, help=doc_of(SearchConfig, "max_candidates"))
    p.add_argument("--multiple_of", type=int, default=None, help=doc_of(SearchConfig, "multiple_of"))
    p.add_argument("--eval_blocks", type=int, default=16, help="held-out blocks for the perplexity summary")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("overrides", nargs="*", help="PruneConfig overrides key=value, e.g. search.score=kl (listed below)")
    return p


def prune_config_from_args(args: argparse.Namespace):
    """PruneConfig from the options (and key=value overrides); ConfigError on bad values."""
    from .config import merge_dicts, parse_overrides
    from .prune.pipeline import PruneConfig

    shape = {k: getattr(args, k) for k in SHAPE_OPTIONS if getattr(args, k) is not None}
    target = dict(shape, non_embedding=args.non_embedding)
    if args.target_params is not None:
        target["params"] = args.target_params
    data = {
        "importance": {"method": args.importance},
        "calib_blocks": args.calib_blocks,
        "target": target,
        "reconstruction": {"enabled": not args.no_reconstruction},
        "overwrite": args.overwrite,
    }
    if args.layer_method:
        data["layer_method"] = args.layer_method
    search = {k: getattr(args, k) for k in ("max_candidates", "multiple_of") if getattr(args, k) is not None}
    if search:
        data["search"] = search
    return PruneConfig.from_dict(merge_dicts(data, parse_overrides(args.overrides)))


def run_prune(args: argparse.Namespace) -> dict:
    """Prune as the options say; returns the summary written to ``prune_summary.json``."""
    from .adapters import get_adapter
    from .data import DataConfig, build_text_data, check_data_source
    from .evaluation.perplexity import heldout_loss
    from .models import ModelConfig, load_model_and_tokenizer
    from .prune.pipeline import check_output_dir, prune_model
    from .prune.save import save_student

    cfg = prune_config_from_args(args)
    data_cfg = DataConfig.from_dict(
        {"source": args.calib_data, "text_column": args.text_column, "seq_len": args.seq_len,
         "max_documents": args.max_documents}
    )
    # Everything that can fail on the input fails here, before the teacher is loaded.
    check_output_dir(args.output, args.overwrite, sources=tuple(s for s in (args.model, args.tokenizer) if s))
    check_data_source(data_cfg)
    teacher, tokenizer = load_model_and_tokenizer(
        ModelConfig(source=args.model, tokenizer=args.tokenizer, trust_remote_code=args.trust_remote_code)
    )
    data = build_text_data(data_cfg, tokenizer)

    def ppl(model) -> dict:
        return heldout_loss(model, data.heldout.batches(cfg.search.batch_size, args.eval_blocks))

    before = ppl(teacher)
    result = prune_model(teacher, tokenizer, data, cfg, teacher_source=args.model)
    after = ppl(result.student)
    adapter = get_adapter(teacher)
    summary = {
        "teacher": args.model,
        "shape_before": adapter.shape(teacher.config),
        "shape_after": adapter.shape(result.student.config),
        "params_before": result.params_before,
        "params_after": result.params_after,
        "non_embedding_params_before": result.non_embedding_params_before,
        "non_embedding_params_after": result.non_embedding_params_after,
        "target_params": result.target_params,
        "heldout_perplexity_before": before["perplexity"],
        "heldout_perplexity_after": after["perplexity"],
        "heldout_tokens": after["tokens"],
        "importance": result.prune_map.importance,
        "refit": list(result.prune_map.refit),
        "timings_s": result.timings,
        "candidates": result.candidates,
    }
    out = save_student(
        result.student, tokenizer, result.prune_map, args.output, overwrite=args.overwrite,
        extra_files={
            "prune_config.json": json.dumps(cfg.to_dict(), indent=1) + "\n",
            "prune_summary.json": json.dumps(summary, indent=1, default=str) + "\n",
        },
    )
    _log_prune_summary(summary, out)
    return summary


def _log_prune_summary(s: dict, out) -> None:
    def shape(d):
        return ", ".join(f"{k}={d[k]}" for k in SHAPE_OPTIONS)

    logging.getLogger("prune").info(
        "pruned student saved to %s\n"
        "  shape       %s\n"
        "           -> %s\n"
        "  parameters  %s -> %s (%.1f%%); non-embedding %s -> %s (%.1f%%)\n"
        "  held-out perplexity %.2f -> %.2f (%d tokens, before any retraining)",
        out, shape(s["shape_before"]), shape(s["shape_after"]),
        f"{s['params_before']:,}", f"{s['params_after']:,}", 100 * s["params_after"] / s["params_before"],
        f"{s['non_embedding_params_before']:,}", f"{s['non_embedding_params_after']:,}",
        100 * s["non_embedding_params_after"] / s["non_embedding_params_before"],
        s["heldout_perplexity_before"], s["heldout_perplexity_after"], s["heldout_tokens"],
    )


def _prune_main(argv: list[str], prog: str | None = None) -> int:
    args = prune_parser(prog).parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_prune(args)
    return 0


# ------------------------------------------------------------------ distill
DISTILL_DESCRIPTION = """\
Prune a teacher and distill the student back: accelerate launch -m minidistill.cli distill --config X.yaml

Any config key (listed below) can be overridden after the options, e.g. train.max_steps=5
data.seq_len=128. --resume continues the run from its latest checkpoint (or --resume PATH from a
given one); --resume auto resumes an unfinished run, starts a fresh one otherwise, and never
overwrites a finished run (it writes to <run_name>-2, ...). The same command runs on one CPU, one
GPU, several GPUs and several nodes (the accelerate launch config picks DDP, FSDP2 or DeepSpeed)."""

_OVERRIDE = re.compile(r"^-{0,2}[A-Za-z_][\w.]*=")


def distill_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Options of ``minidistill distill`` / ``recipes/prune_distill.py``; the epilog lists every config key."""
    from .recipe_config import PruneDistillConfig

    parser = argparse.ArgumentParser(prog=prog, description=DISTILL_DESCRIPTION, formatter_class=_FORMATTER,
                                     epilog=_epilog("config keys (YAML or key=value overrides):", PruneDistillConfig))
    parser.add_argument("--config", help="recipe YAML (recipes/configs/*.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from the latest checkpoint, from PATH, or 'auto' (resume if unfinished, else start anew without overwriting)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.lr=1e-4")
    return parser


def parse_distill_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides; ``--resume key=value`` is ``--resume`` followed by an override."""
    args = distill_parser(prog).parse_intermixed_args(argv)
    if args.resume is not None and _OVERRIDE.match(args.resume) and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    return args


def _distill_main(argv: list[str], prog: str | None = None) -> int:
    args = parse_distill_args(argv, prog)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .recipe_config import load_recipe_config
    from .train import run_prune_distill

    cfg = load_recipe_config(args.config, args.overrides)
    if args.config and cfg.config_file is None:
        cfg = cfg.replace(config_file=args.config)
    result = run_prune_distill(cfg, resume=args.resume)
    if rank == 0:
        logging.getLogger("prune_distill").info("distilled model: %s", result.model_dir)
    return 0


# ------------------------------------------------------------------ push
PUSH_DESCRIPTION = """\
Push a finished run folder to the Hugging Face Hub with a generated model card.
The token comes from HF_TOKEN or the login cache (`hf auth login`)."""


def push_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Options of ``minidistill push`` / ``recipes/push.py`` (help from HubConfig's field docstrings)."""
    from .publish.hub import HubConfig

    parser = argparse.ArgumentParser(prog=prog, description=PUSH_DESCRIPTION, formatter_class=_FORMATTER)
    parser.add_argument("folder", help="the run's saved model folder (config.json + *.safetensors)")
    parser.add_argument("--repo_id", required=True, help=doc_of(HubConfig, "repo_id"))
    parser.add_argument("--private", action="store_true", help=doc_of(HubConfig, "private"))
    parser.add_argument("--revision", default=None, help=doc_of(HubConfig, "revision"))
    parser.add_argument("--message", default=HubConfig.commit_message, help=doc_of(HubConfig, "commit_message"))
    parser.add_argument("--endpoint", default=None, help=doc_of(HubConfig, "endpoint"))
    parser.add_argument("--teacher", default=None, help="teacher source when the folder does not record it")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _push_main(argv: list[str], prog: str | None = None) -> int:
    from huggingface_hub import constants

    from .errors import MinidistillError
    from .publish.hub import HubConfig, HubError, push_to_hub, resolve_token, run_folder_files
    from .publish.model_card import build_model_card, run_info_from_folder

    args = push_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = HubConfig(
        repo_id=args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.message, endpoint=args.endpoint,
    )
    # Cheap checks first: config, folder contents, token, offline mode.
    cfg.validate()
    run_folder_files(args.folder)
    resolve_token()
    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set: unset it (and HF_DATASETS_OFFLINE if needed) to push to the Hub")
    try:
        info = run_info_from_folder(args.folder, teacher_source=args.teacher, model_name=args.repo_id)
        card = build_model_card(info)
    except ValueError as err:
        if isinstance(err, MinidistillError):
            raise
        raise HubError(f"{args.folder}: cannot build the model card: {err} (--teacher SOURCE names the teacher)") from err
    print(push_to_hub(args.folder, cfg, card=card))
    return 0


# ------------------------------------------------------------------ eval, export-gguf
def _eval_main(argv: list[str], prog: str | None = None) -> int:
    from .evaluation.lm_eval_runner import main as lm_eval_main

    if prog:
        sys.argv[0] = prog  # argparse names the program after sys.argv[0]
    return lm_eval_main(argv)


EXPORT_GGUF_DESCRIPTION = """\
Write a run's model (or any saved model folder) as one GGUF file for llama.cpp / Ollama / LM Studio,
tokenizer and teacher / prune-map metadata included. Written under a temporary name, then renamed."""


def export_gguf_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Options of ``minidistill export-gguf`` / ``recipes/export_gguf.py``."""
    from .publish.export_gguf import OUTTYPES

    p = argparse.ArgumentParser(prog=prog, description=EXPORT_GGUF_DESCRIPTION, formatter_class=_FORMATTER)
    p.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="a run folder (runs/<name>) or a saved model folder")
    p.add_argument("--outtype", default="f16",
                   help=f"weight type of the matrices: {', '.join(OUTTYPES)} (vectors stay f32; a recipe sets it as export.gguf)")
    p.add_argument("--output", default=None, help="the .gguf file (default: <model folder>.<outtype>.gguf next to it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--teacher", default=None, help="teacher source for the metadata when the folder does not record it")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _export_gguf_main(argv: list[str], prog: str | None = None) -> int:
    from .publish.export_gguf import export_gguf

    args = export_gguf_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = export_gguf(args.source, args.output, outtype=args.outtype, overwrite=args.overwrite, teacher=args.teacher)
    print(result.path)
    return 0


# ------------------------------------------------------------------ the commands
COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "prune": (_prune_main, "prune a teacher to a parameter budget or a shape (recipes/prune.py)"),
    "distill": (_distill_main, "prune and distill with a recipe config (recipes/prune_distill.py; accelerate launch -m minidistill.cli distill)"),
    "eval": (_eval_main, "score saved models side by side on lm-eval tasks (eval/run_lm_eval.py)"),
    "push": (_push_main, "push a run folder to the Hugging Face Hub with a model card (recipes/push.py)"),
    "export-gguf": (_export_gguf_main, "write a run's model as a GGUF file for llama.cpp (recipes/export_gguf.py)"),
}


def command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one command like its script: a bad input is one ``error [...]`` line and its exit code."""
    function = COMMANDS[name][0]
    return run_cli(lambda a: function(a, prog=prog), argv)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: minidistill COMMAND [options]   (minidistill COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``minidistill COMMAND ...``: dispatch to the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        error = ConfigError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (minidistill --help)")
        print(format_error(error), file=sys.stderr)
        return error.exit_code
    return command(name, rest, prog=f"minidistill {name}")


if __name__ == "__main__":
    sys.exit(main())

"""Quality study on the bundled teacher at ~50% of its non-embedding parameters: what recovers quality.

Comparisons (``--groups``), each row scored the same way (held-out perplexity on the project's held-out
blocks, and the offline lm-eval tasks ``minidistill_heldout_ppl`` / ``minidistill_lastword``):

1. ``importance``: importance method before any retraining: activation (neurons re-fit-ranked, the
   default; and neurons by activation) vs magnitude vs Taylor vs random (each method's own scores and
   layer scores; least-squares reconstruction on, as in the library's default);
2. ``objective``: retraining objective at equal tokens, from the activation-pruned student: LM loss only
   vs logit KD vs logit KD + hidden + attention vs that + relations;
3. ``shape``: width-only vs depth-only vs both at equal parameters (logit KD + hidden + attention);
4. ``init``: pruned-then-distilled vs the same shape randomly initialised and distilled, at equal tokens;
5. ``match``: what else the student matches besides logits (``bench/quality_match.py``), equal tokens;
6. ``pruning``: pruning options before retraining: re-fit off / teacher / sequential at the searched
   shape, and depth-only at half the layers with each layer method.

Training modes (``--groups modes``, their own table in ``bench/RESULTS.md``), equal tokens per trained model,
from the same pruned student: one student with logit KD vs deep mutual learning (two peers, with the
teacher and without it, against LM loss only), a born-again second generation, network augmentation and an
early exit (the full model and the model stopped there).

    python bench/quality.py --write            # ~2 hours on 2 CPU cores; table into bench/RESULTS.md
    python bench/quality.py --groups pruning   # one comparison (the teacher row is always measured)
    python bench/quality.py --quick            # CI-sized run of every row (a few minutes)
    python bench/quality.py --groups modes --write   # the training-modes table (~30 min)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quality_match  # noqa: E402  (bench/ is on sys.path when run as a script)
from results_file import write_section  # noqa: E402

from minidistill.adapters import count_parameters, get_adapter  # noqa: E402
from minidistill.data import DataConfig, TextData, build_text_data  # noqa: E402
from minidistill.distill.exits import ExitConfig, load_exit_model, save_exits  # noqa: E402
from minidistill.distill.mutual import MutualConfig, perturbed_copy  # noqa: E402
from minidistill.distill.netaug import NetAugConfig  # noqa: E402
from minidistill.distill.objective import DistillLossConfig  # noqa: E402
from minidistill.evaluation.lm_eval_runner import LmEvalConfig, run_lm_eval  # noqa: E402
from minidistill.evaluation.metrics import top1_agreement  # noqa: E402
from minidistill.evaluation.perplexity import heldout_loss  # noqa: E402
from minidistill.evaluation.tasks import prepare_local_tasks  # noqa: E402
from minidistill.models import ModelConfig, load_model_and_tokenizer  # noqa: E402
from minidistill.prune.importance import ImportanceConfig  # noqa: E402
from minidistill.prune.pipeline import PruneConfig, prune_model  # noqa: E402
from minidistill.prune.reconstruct import ReconstructionConfig  # noqa: E402
from minidistill.prune.targets import SearchConfig, TargetConfig  # noqa: E402
from minidistill.training.config import EvalConfig, TrainConfig  # noqa: E402
from minidistill.training.loop import Distiller  # noqa: E402

SECTION = "## Quality study"
METHODS = ("activation", "magnitude", "taylor", "random")
HALF = TargetConfig(params=0.5, non_embedding=True)
FEATURES = {
    "hidden": {"weight": 1.0, "kind": "nmse", "pairing": {"strategy": "prune_map"}},
    "attention": {"weight": 1.0, "pairing": {"strategy": "prune_map"}},
}
OBJECTIVES = {
    "LM loss only": {"logits": {"ce_weight": 1.0}},
    "logit KD": {},
    "KD + hidden + attention": {**FEATURES, "balance": "auto"},
    "KD + hidden + attention + relations": {**FEATURES, "relations": {"weight": 1.0}, "balance": "auto"},
    **{f"match: {name}": loss for name, loss in quality_match.OBJECTIVES.items()},
}
MAIN_OBJECTIVE = "KD + hidden + attention"
IMPORTANCE = "1. importance (no retraining)"
OBJECTIVE = "2. objective (equal tokens)"
SHAPE = "3. width vs depth (equal params)"
INIT = "4. initialisation (equal tokens)"
MATCH = f"5. {quality_match.GROUP}"
PRUNING = "6. pruning options (no retraining)"
MODES_SECTION = "## Quality study: training modes"
MODES = "training modes (equal tokens per model)"
NETAUG = {"alpha": 1.0, "width_ratios": [0.25, 0.5, 1.0]}
MUTUAL_RUNS = {
    # name: (objective against the teacher, mutual settings); the peer is a copy of the student with 1% noise.
    "mutual, 2 peers + teacher": ("logit KD", {"copies": 1, "noise": 0.01, "weight": 1.0, "teacher_weight": 1.0}),
    # Zhang et al.'s loss, CE + KL to the other peer, and no teacher: compare with "LM loss only".
    "mutual, 2 peers, no teacher": ("logit KD", {"copies": 1, "noise": 0.01, "weight": 2.0, "teacher_weight": 0.0,
                                                 "ce_weight": 0.5}),
}

logger = logging.getLogger("bench.quality")


@dataclass
class Sizes:
    """Run sizes; ``quick()`` is the CI-sized variant."""

    seq_len: int = 256
    calib_blocks: int = 32
    eval_blocks: int = 16
    batch_size: int = 4
    steps: int = 32
    warmup_steps: int = 3
    lr: float = 2e-4
    lm_eval_limit: int | None = 30
    lastword_items: int = 100
    layer_loss_blocks: int = PruneConfig.layer_loss_blocks

    @classmethod
    def quick(cls) -> Sizes:
        return cls(seq_len=64, calib_blocks=4, eval_blocks=2, batch_size=2, steps=2, warmup_steps=1,
                   lm_eval_limit=4, lastword_items=8, layer_loss_blocks=1)


@dataclass
class Row:
    """One measured model."""

    group: str
    name: str
    shape: dict[str, int]
    non_embedding_fraction: float
    tokens: int
    seconds: float
    perplexity: float
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


class Study:
    """Holds the teacher, data, task folder and sizes; measures and records rows."""

    def __init__(self, sizes: Sizes, work_dir: Path):
        self.sizes = sizes
        self.work_dir = work_dir
        self.teacher, self.tokenizer = load_model_and_tokenizer(ModelConfig())
        self.teacher.eval()
        self.data_cfg = DataConfig(seq_len=sizes.seq_len)
        self.data: TextData = build_text_data(self.data_cfg, self.tokenizer)
        self.heldout = list(self.data.heldout.batches(sizes.batch_size, sizes.eval_blocks))
        self.task_dir = prepare_local_tasks(self.data_cfg, work_dir / "tasks", max_lastword_items=sizes.lastword_items)
        self.teacher_shape = get_adapter(self.teacher).shape(self.teacher.config)
        self.full_ne = count_parameters(self.teacher, non_embedding=True)
        self.rows: list[Row] = []

    # ------------------------------------------------------------------ measuring
    def score(self, group: str, name: str, model, *, tokens: int, seconds: float, **extra) -> Row:
        model.eval()
        ppl = heldout_loss(model, self.heldout)["perplexity"]
        if model is not self.teacher:
            extra["top1_agreement"] = top1_agreement(model, self.teacher, self.heldout)
        cfg = LmEvalConfig(limit=self.sizes.lm_eval_limit, batch_size=self.sizes.batch_size,
                           max_lastword_items=self.sizes.lastword_items)
        table = run_lm_eval({name: (model, self.tokenizer)}, cfg, task_dir=self.task_dir)
        row = Row(group=group, name=name, shape=dict(get_adapter(model).shape(model.config)),
                  non_embedding_fraction=count_parameters(model, non_embedding=True) / self.full_ne,
                  tokens=tokens, seconds=seconds, perplexity=ppl, lm_eval=table.rows[0].metrics, extra=extra)
        self.rows.append(row)
        logger.warning("%s | %s: ppl %.2f, lm-eval %s (%.0f s, %d tokens)", group, name, ppl, row.lm_eval, seconds, tokens)
        return row

    def repeat(self, row: Row, group: str, name: str) -> Row:
        """``row``'s model listed again under another comparison (not scored twice)."""
        again = dataclasses.replace(row, group=group, name=name)
        self.rows.append(again)
        return again

    def prune(self, method: str, target: TargetConfig | dict[str, int], layer_method: str,
              search: SearchConfig | None = None, *, neuron_ranking: str = "refit",
              reconstruction: ReconstructionConfig | None = None):
        """(student, prune map, seconds) from the library's pruning pipeline; ``target``: a budget or a shape."""
        cfg = PruneConfig(
            importance=ImportanceConfig(method=method, batch_size=self.sizes.batch_size, cache=False,
                                        neuron_ranking=neuron_ranking),
            layer_method=layer_method,
            layer_loss_blocks=self.sizes.layer_loss_blocks,
            calib_blocks=self.sizes.calib_blocks,
            target=target if isinstance(target, TargetConfig) else TargetConfig(**target),
            search=search or SearchConfig(),
            reconstruction=reconstruction or ReconstructionConfig(),
            show_progress=False,
        )
        t0 = time.perf_counter()
        result = prune_model(self.teacher, self.tokenizer, self.data, cfg, teacher_source="bundled")
        return result.student, result.prune_map, time.perf_counter() - t0

    def distill(self, student, pmap, objective: str, name: str, start_ppl: float | None = None):
        """Train a copy of ``student`` for ``sizes.steps`` steps; (trained student, tokens, seconds, start ppl).

        ``start_ppl``: ``student``'s held-out perplexity when already measured (else it is measured here).
        """
        module, tokens, seconds, start_ppl = self.train_module(student, pmap, objective, name, start_ppl=start_ppl)
        return module.student, tokens, seconds, start_ppl

    def train_module(self, student, pmap, objective: str, name: str, *, start_ppl: float | None = None, teacher=None,
                     mutual: dict | None = None, **options):
        """Train a copy of ``student`` (from ``teacher``, default the study's) with a training mode's ``options``
        (``mutual``, ``exits``, ``netaug`` settings as dicts); (trained DistillationModule, tokens, seconds, start ppl)."""
        s = self.sizes
        if start_ppl is None:
            start_ppl = heldout_loss(student.eval(), self.heldout)["perplexity"]
        loss = DistillLossConfig.from_dict(OBJECTIVES[objective])
        train = TrainConfig(max_steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps,
                            schedule="cosine", min_lr_ratio=0.1, progress_bar=False, keep_last=1)
        cfg = MutualConfig.from_dict(mutual) if mutual is not None else None
        peers = [perturbed_copy(student, cfg.noise, seed=train.seed + i) for i in range(1, cfg.copies + 1)] if cfg else []
        kinds = {"exits": ExitConfig, "netaug": NetAugConfig}
        distiller = Distiller(
            student=copy.deepcopy(student), teacher=teacher or self.teacher, data=self.data, prune_map=pmap, loss=loss,
            train=train, eval=EvalConfig(max_blocks=1, batch_size=s.batch_size),
            run_dir=self.work_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", name),
            config_dict={"objective": objective, "mutual": mutual, **options}, mutual=cfg, peers=peers,
            peer_prune_maps=[pmap] * len(peers), **{k: kinds[k].from_dict(v) for k, v in options.items()},
        )
        result = distiller.run()
        module = result.accelerator.unwrap_model(result.module)
        shutil.rmtree(distiller.run_dir, ignore_errors=True)  # its checkpoint (weights + optimizer state)
        return module, result.tokens, result.seconds, start_ppl

    # ------------------------------------------------------------------ the comparisons
    def run(self, groups: list[str]) -> None:
        self.score("teacher", "teacher", self.teacher, tokens=0, seconds=0.0)
        for name in groups:
            {**GROUPS, **MODE_GROUPS}[name](self)

    def main_pruned(self):
        """(student, prune map, row) of the budget search's pick with activation importance, scored once.

        Group 1 lists it; the objective, initialisation and match comparisons all start from it.
        """
        if not hasattr(self, "_main"):
            tokens = min(self.sizes.calib_blocks, len(self.data.train)) * self.sizes.seq_len
            student, pmap, seconds = self.prune("activation", HALF, layer_method="block_influence")
            row = self.score(IMPORTANCE, "activation", student, tokens=tokens, seconds=seconds)
            self._main = (student, pmap, row)
        return self._main

    def importance_group(self) -> None:
        # The budget search picks the shape with activation importance; the other methods prune to that
        # same shape, each with its own unit and layer scores (neurons too: no re-fit ranking).
        student, pmap, _ = self.main_pruned()
        tokens = min(self.sizes.calib_blocks, len(self.data.train)) * self.sizes.seq_len
        both = {k: v for k, v in pmap.student_shape.items() if k != "head_dim"}
        other, _, seconds = self.prune("activation", both, layer_method="block_influence", neuron_ranking="method")
        self.score(IMPORTANCE, "activation, neurons by activation", other, tokens=tokens, seconds=seconds)
        for method in METHODS[1:]:
            other, _, seconds = self.prune(method, both, layer_method="unit", neuron_ranking="method")
            self.score(IMPORTANCE, method, other, tokens=tokens, seconds=seconds)
            del other

    def _objective_rows(self, group: str, names: list[str], label=lambda name: name) -> dict[str, Row]:
        student, pmap, pruned_row = self.main_pruned()
        rows = {}
        for objective in names:
            model, tokens, seconds, start = self.distill(student, pmap, objective, f"objective {objective}",
                                                         start_ppl=pruned_row.perplexity)
            rows[objective] = self.score(group, label(objective), model, tokens=tokens, seconds=seconds,
                                         start_perplexity=start)
            del model
        return rows

    def main_distilled(self) -> Row:
        """The searched student distilled with the main objective (measured once, listed where compared)."""
        if not hasattr(self, "_main_distilled"):
            self._main_distilled = self._objective_rows(OBJECTIVE, [MAIN_OBJECTIVE])[MAIN_OBJECTIVE]
        return self._main_distilled

    def objective_group(self) -> None:
        self.main_distilled()
        self._objective_rows(OBJECTIVE, [o for o in OBJECTIVES if o != MAIN_OBJECTIVE and not o.startswith("match: ")])

    def shape_group(self) -> None:
        # Width only: the budget search restricted to all layers; depth only: half the layers, full width.
        targets = {"width only": (HALF, SearchConfig(max_layer_drop=0.0)),
                   "depth only": ({"num_layers": self.teacher_shape["num_layers"] // 2}, SearchConfig())}
        for label, (target, search) in targets.items():
            s, p, _ = self.prune("activation", target, layer_method="block_influence", search=search)
            model, tokens, seconds, start = self.distill(s, p, MAIN_OBJECTIVE, label)
            self.score(SHAPE, label, model, tokens=tokens, seconds=seconds, start_perplexity=start)
            del s, p, model
        self.repeat(self.main_distilled(), SHAPE, "width + depth")

    def init_group(self) -> None:
        student, pmap, _ = self.main_pruned()
        self.repeat(self.main_distilled(), INIT, "pruned, distilled")
        model, tokens, seconds, start = self.distill(self.random_init(student), pmap, MAIN_OBJECTIVE, "random init")
        self.score(INIT, "random init, distilled", model, tokens=tokens, seconds=seconds, start_perplexity=start)

    def match_group(self) -> None:
        self._objective_rows(MATCH, [f"match: {name}" for name in quality_match.OBJECTIVES],
                             label=lambda name: name.removeprefix("match: "))

    def pruning_group(self) -> None:
        """Pruning options before retraining: re-fit modes at the searched shape, layer methods at half depth."""
        _, pmap, _ = self.main_pruned()
        tokens = min(self.sizes.calib_blocks, len(self.data.train)) * self.sizes.seq_len
        both = {k: v for k, v in pmap.student_shape.items() if k != "head_dim"}
        for label, recon in (("no re-fit", ReconstructionConfig(enabled=False)),
                             ("teacher-mode re-fit", ReconstructionConfig(mode="teacher")),
                             ("sequential re-fit", ReconstructionConfig(mode="sequential"))):
            s, _, seconds = self.prune("activation", both, layer_method="block_influence", reconstruction=recon)
            self.score(PRUNING, f"searched shape, {label}", s, tokens=tokens, seconds=seconds)
            del s
        half = {"num_layers": self.teacher_shape["num_layers"] // 2}
        for method in ("block_influence", "contiguous", "iterative"):
            s, _, seconds = self.prune("activation", half, layer_method=method)
            self.score(PRUNING, f"depth only (half the layers), {method}", s, tokens=tokens, seconds=seconds)
            del s

    def modes_group(self) -> None:
        """One student against each training mode, from the same pruned student, at equal tokens per trained model."""
        student, pmap, pruned_row = self.main_pruned()
        start = pruned_row.perplexity
        one = {}
        for objective in ("logit KD", "LM loss only"):
            module, tokens, seconds, _ = self.train_module(student, pmap, objective, f"modes {objective}", start_ppl=start)
            self.score(MODES, f"one student, {objective}", module.student, tokens=tokens, seconds=seconds,
                       start_perplexity=start)
            one[objective] = module.student
        for label, (objective, mutual) in MUTUAL_RUNS.items():
            module, tokens, seconds, _ = self.train_module(student, pmap, objective, label, start_ppl=start, mutual=mutual)
            for i, model in enumerate(module.trainable_models()):
                self.score(MODES, f"{label}: {'student' if i == 0 else f'peer {i}'}", model, tokens=tokens,
                           seconds=seconds, start_perplexity=start)
            del module
        # Born-again: generation 1 starts from the pruned student again and learns from generation 0 (the row above).
        module, tokens, seconds, _ = self.train_module(student, None, "logit KD", "born-again gen 1", start_ppl=start,
                                                       teacher=one["logit KD"].eval())
        self.score(MODES, "born-again: generation 1 (from the one-student logit KD model)", module.student, tokens=tokens,
                   seconds=seconds, start_perplexity=start)
        del module
        module, tokens, seconds, _ = self.train_module(student, pmap, "logit KD", "netaug", start_ppl=start,
                                                       netaug=NETAUG)
        self.score(MODES, "netaug (the student's weights also trained inside a wider model)", module.student,
                   tokens=tokens, seconds=seconds, start_perplexity=start)
        del module
        layers = get_adapter(student).shape(student.config)["num_layers"]
        exits = {"layers": [layers // 2 - 1]}
        module, tokens, seconds, _ = self.train_module(student, pmap, "logit KD", "exits", start_ppl=start, exits=exits)
        row = self.score(MODES, f"exit after layer {exits['layers'][0]} (be your own teacher): full model", module.student,
                         tokens=tokens, seconds=seconds, start_perplexity=start)
        folder = self.work_dir / "exit_model"
        module.student.save_pretrained(folder)
        save_exits(module.exits, module.exits.state_dict(), folder, final_norm=get_adapter(student).final_norm)
        self.score(MODES, f"exit after layer {exits['layers'][0]} (be your own teacher): stopped at the exit",
                   load_exit_model(folder, exits["layers"][0]), tokens=row.tokens, seconds=row.seconds, start_perplexity=start)
        shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def random_init(student):
        """A model of ``student``'s config with freshly initialised weights (seed 0)."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(student.config, dtype=next(student.parameters()).dtype)


GROUPS = {
    "importance": Study.importance_group,
    "objective": Study.objective_group,
    "shape": Study.shape_group,
    "init": Study.init_group,
    "match": Study.match_group,
    "pruning": Study.pruning_group,
}
MODE_GROUPS = {"modes": Study.modes_group}
"""Comparisons of training modes, written to their own section (``MODES_SECTION``)."""


# ---------------------------------------------------------------------------------------------- output
def _shape_str(shape: dict[str, int]) -> str:
    return f"L{shape['num_layers']} D{shape['hidden_size']} H{shape['num_heads']}/KV{shape['num_kv_heads']} I{shape['intermediate_size']}"


def _metric(row: Row, task: str, metric: str) -> str:
    value = row.lm_eval.get(task, {}).get(metric)
    return "n/a" if value is None else f"{value:.3f}" if metric == "acc" else f"{value:.2f}"


def render(study: Study, args, wall: float) -> str:
    s = study.sizes
    device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    modes = set(args.group_list) <= set(MODE_GROUPS)
    lines = [
        MODES_SECTION if modes else SECTION,
        "",
        f"`python bench/quality.py{' --quick' if args.quick else ''}{' --groups modes' if modes else ''}` on {datetime.date.today().isoformat()}, {device}, "
        f"torch {torch.__version__}, {wall / 60:.0f} min in all. Bundled teacher SmolLM2-135M-Instruct "
        f"({study.full_ne:,} non-embedding parameters), bundled corpus in blocks of {s.seq_len} tokens. Pruning: "
        f"{s.calib_blocks} calibration blocks, reconstruction on. Retraining: {s.steps} steps of {s.batch_size} x "
        f"{s.seq_len} tokens, AdamW lr {s.lr:g}, {s.warmup_steps} warm-up steps, cosine to 10%. Perplexity: "
        f"{s.eval_blocks} held-out blocks. lm-eval (offline, local tasks from the held-out documents): "
        f"`minidistill_heldout_ppl` word perplexity and `minidistill_lastword` accuracy, "
        f"{s.lm_eval_limit or 'all'} items each. Tokens and seconds: calibration (importance and reconstruction) "
        "for group 1, training for the others. Top-1 agreement: fraction of held-out positions where the model's "
        "greedy next token is the teacher's. Rows repeated across comparisons are the same model."
        + (" Mutual learning rows: each peer trained on the same tokens as the one student; seconds are the whole "
           "run's (all peers together)." if modes else ""),
        "",
        "| comparison | model | shape | non-emb. kept | tokens | seconds | ppl before retraining | held-out ppl "
        "| top-1 agreement | lm-eval word ppl | last-word acc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in study.rows:
        start = r.extra.get("start_perplexity")
        agreement = r.extra.get("top1_agreement")
        lines.append(
            f"| {r.group} | {r.name} | {_shape_str(r.shape)} | {r.non_embedding_fraction:.1%} | {r.tokens:,} | "
            f"{r.seconds:.0f} | {'-' if start is None else f'{start:.2f}'} | {r.perplexity:.2f} | "
            f"{'-' if agreement is None else f'{agreement:.3f}'} | "
            f"{_metric(r, 'minidistill_heldout_ppl', 'word_perplexity')} | {_metric(r, 'minidistill_lastword', 'acc')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run: tiny blocks, 2 steps, few lm-eval items")
    p.add_argument("--steps", type=int, help="retraining steps per row (default 32; 2 with --quick)")
    p.add_argument("--groups", default=",".join(GROUPS),
                   help=f"comma-separated comparisons to run, of {', '.join([*GROUPS, *MODE_GROUPS])} (default: all but modes)")
    p.add_argument("--write", action="store_true",
                   help="put the table into bench/RESULTS.md (all groups, or modes alone into its own section)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--work-dir", type=Path, help="folder for run files (default: a temporary folder)")
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS and g not in MODE_GROUPS]
    if unknown or not groups:
        p.error(f"--groups {args.groups!r}: choose from {', '.join([*GROUPS, *MODE_GROUPS])}")
    if args.write and set(groups) != set(GROUPS) and set(groups) != set(MODE_GROUPS):
        p.error("--write replaces a whole table: run every study group (no --groups), or --groups modes alone")
    args.group_list = groups
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.steps:
        sizes.steps = args.steps
    started = time.perf_counter()
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minidistill-quality-") as tmp:
        study = Study(sizes, args.work_dir or Path(tmp))
        study.run(groups)
    wall = time.perf_counter() - started
    table = render(study, args, wall)
    print(table)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in study.rows], indent=1))
    if args.write:
        write_section(table)


if __name__ == "__main__":
    main()

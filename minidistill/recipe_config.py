"""The composed config of the prune-and-distill recipe (``recipes/prune_distill.py``).

Loaded from YAML (``recipes/configs/*.yaml``) with ``a.b=c`` overrides on top
(:func:`load_recipe_config`); every key is a dataclass field with its docstring, unknown keys fail
with the nearest valid one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigBase, ConfigError, load_config
from .data import TEACHER_SAMPLES, DataConfig
from .distill.born_again import BornAgainConfig, check_born_again
from .distill.exits import ExitConfig, check_exits
from .distill.mutual import MutualConfig, check_mutual
from .distill.netaug import NetAugConfig, check_netaug_combination
from .distill.objective import STUDENT, TEACHER, DistillLossConfig, check_cache_compatible, check_term_roles, feature_terms
from .distill.on_policy import OnPolicyConfig, check_on_policy
from .distill.roles import PEER_ROLE, ROLE_NAME
from .distill.teacher_cache import TeacherCacheConfig
from .distill.teacher_samples import CORPUS, TeacherSamplesConfig
from .publish.export_gguf import GGUFExportConfig
from .publish.hub import HubConfig
from .models import ModelConfig
from .teacher_correction import TeacherCorrectionConfig
from .training.config import EvalConfig, LoraSettings, TrainConfig

try:  # the pruner's config; absent only in partial checkouts
    from .prune.pipeline import PruneConfig
except ImportError:  # pragma: no cover
    PruneConfig = dict  # type: ignore[assignment,misc]

__all__ = [
    "EvalConfig",
    "LoraSettings",
    "PruneDistillConfig",
    "RoleConfig",
    "TrainConfig",
    "incompatible_fields",
    "load_recipe_config",
]


@dataclass
class RoleConfig(ModelConfig):
    """A further model of the run: where it comes from, and whether it trains."""

    trainable: bool = False
    """Train it with the student (terms may name it as ``source``; exported to ``<run_dir>/model_<name>/``); false:
    frozen, placed like the teacher, only a ``target``."""


def _default_prune():
    return PruneConfig() if PruneConfig is not dict else None


@dataclass
class PruneDistillConfig(ConfigBase):
    """Prune a teacher (or take an already-pruned student), distill the student, save a plain HF model."""

    run_name: str = "prune_distill"
    """Name of the run; outputs go to ``<output_root>/<run_name>/``."""
    output_root: str = "runs"
    """Folder holding run folders."""
    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The frozen teacher."""
    student: ModelConfig | None = None
    """An already-pruned student folder (with its prune_map.json when it came from this teacher); None: prune the teacher."""
    prune: PruneConfig | None = field(default_factory=_default_prune)  # type: ignore[valid-type]
    """How the teacher is pruned when no student is given."""
    teacher_correction: TeacherCorrectionConfig | None = None
    """A short LM-loss fine-tune of the teacher on ``data.train`` before pruning and distillation (null: none); saved to ``<run_dir>/teacher_corrected/``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out text."""
    teacher_samples: TeacherSamplesConfig | None = None
    """How the teacher writes the text of the data source ``teacher_samples`` (null: the defaults, when the data names it)."""
    roles: dict[str, RoleConfig] = field(default_factory=dict)
    """Further models by role name, sharing the teacher's tokenizer, for loss terms to name: frozen ones as a
    ``target`` (a second teacher: ``roles.teacher2.source=<folder>`` with ``loss.terms.kd2: {term: logits, target:
    teacher2}``), placed like the teacher; trained ones (``trainable: true``) also as a ``source``, trained with the
    student and exported to ``<run_dir>/model_<name>/``."""
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    """Distillation objective."""
    teacher_cache: TeacherCacheConfig | None = None
    """The teacher's top-k over ``data.train`` computed once and read by the logit term (null: a teacher forward per step)."""
    on_policy: OnPolicyConfig | None = None
    """On-policy distillation: a share of micro-batches continued by the student, loss on its tokens (null: off)."""
    mutual: MutualConfig | None = None
    """Deep mutual learning: peers trained with the student, each learning from the others (null: the student alone)."""
    born_again: BornAgainConfig | None = None
    """Born-again generations: after the first, each generation of the student learns from the previous one (null: one)."""
    exits: ExitConfig | None = None
    """Be your own teacher: early-exit heads on intermediate layers trained against the final layer (null: none)."""
    netaug: NetAugConfig | None = None
    """Network augmentation: the pruned student also trained inside a wider model sharing its weights (null: off)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation during training and lm-eval after it."""
    hub: HubConfig | None = None
    """Where the distilled model is pushed (with push_to_hub)."""
    push_to_hub: bool = False
    """Push ``<run_dir>/model`` to the Hub at the end."""
    export: GGUFExportConfig = field(default_factory=GGUFExportConfig)
    """Files written from the distilled model besides its safetensors folder (``export.gguf=q8_0``)."""
    report: bool = False
    """Write ``metrics.json``, ``report.md`` and ``loss.png`` (teacher / pruned / distilled side by side) at the end."""
    report_new_tokens: int = 24
    """Tokens generated greedily per fixed prompt for the report."""
    config_file: str | None = None
    """The YAML file this config was loaded from (set by the recipe; shown in the report's reproduce command)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.run_name

    def validate(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(f"run_name={self.run_name!r}: must be a plain folder name")
        if self.student is None and self.prune is None:
            raise ConfigError("student is null and prune is null: give student.source (a pruned student) or a prune section")
        if self.push_to_hub and (self.hub is None or not self.hub.repo_id):
            raise ConfigError("push_to_hub=true needs hub.repo_id (e.g. hub.repo_id=you/model-name)")
        if self.student is not None and self.student.source == self.teacher.source:
            raise ConfigError(
                f"student.source={self.student.source!r} is the teacher itself; give a pruned student folder "
                "or set student=null to prune the teacher"
            )
        self._check_roles()
        self._check_teacher_samples()
        if self.teacher_cache is not None and self.teacher_cache.enabled:
            check_cache_compatible(self.loss)
            if self.data.streaming:
                raise ConfigError(
                    "teacher_cache.enabled=true needs the in-memory training blocks it indexes, but data.streaming=true; "
                    "set teacher_cache.enabled=false or data.streaming=false"
                )
        if self.on_policy is not None:
            check_on_policy(self.on_policy, self.loss, seq_len=self.data.seq_len, streaming=self.data.streaming,
                            teacher_cache=self.teacher_cache is not None and self.teacher_cache.enabled)
        if self.mutual is not None:
            self._check_mutual()
        if self.exits is not None:
            check_exits(lora=self.train.lora is not None, on_policy=self.on_policy is not None, mutual=self.mutual is not None)
            if self.born_again is not None:
                raise ConfigError("exits with born_again is not supported; set exits=null or born_again=null")
        if self.netaug is not None:
            check_netaug_combination({
                "train.lora": self.train.lora is not None, "mutual": self.mutual is not None, "exits": self.exits is not None,
                "born_again": self.born_again is not None, "on_policy": self.on_policy is not None,
                "train.gradient_checkpointing": self.train.gradient_checkpointing, "train.compile": self.train.compile,
                "teacher_cache.enabled": self.teacher_cache is not None and self.teacher_cache.enabled})
        if self.born_again is not None:
            check_born_again(mutual=self.mutual is not None, on_policy=self.on_policy is not None)
            features, key = feature_terms(self.loss)
            if self.born_again.ensemble and features:
                raise ConfigError(f"born_again.ensemble=true gives the logit term the generations' mean distribution only; "
                                  f"set {key}=0 (or born_again.ensemble=false)")
        if self.student is not None and self.teacher_correction is not None and self.teacher_correction.enabled:
            raise ConfigError(
                "teacher_correction changes the teacher before pruning, but student.source is already pruned from the "
                "uncorrected teacher (its prune map names that teacher); set student=null to prune the corrected "
                "teacher in this run, or teacher_correction=null"
            )


    def _check_roles(self) -> None:
        for name in self.roles:
            if not ROLE_NAME.fullmatch(name) or name in (STUDENT, TEACHER) or PEER_ROLE.fullmatch(name):
                raise ConfigError(
                    f"roles.{name}: a role name is letters, digits and _ (starting with a letter), other than student, "
                    "teacher and peer<i>; rename it"
                )
        trained = [name for name, role in self.roles.items() if role.trainable]
        check_term_roles(self.loss, roles=[STUDENT, TEACHER, *self.roles], trainable=[STUDENT, *trained])
        enabled = [s for s in self.loss.terms.values() if s.weight > 0]
        for name, role in self.roles.items():
            if role.trainable and name not in {s.source for s in enabled}:
                raise ConfigError(
                    f"roles.{name}.trainable=true but no loss term trains it (names it as source); add a term such as "
                    f"loss.terms.{name}_kd: {{term: logits, source: {name}}}, or set roles.{name}.trainable=false"
                )
            if not role.trainable and name not in {s.target for s in enabled}:
                raise ConfigError(
                    f"roles.{name} is the target of no loss term, so it would be loaded for nothing; add a term such as "
                    f"loss.terms.{name}_kd: {{term: logits, target: {name}}}, or remove roles.{name}"
                )
        if self.roles:
            used = {"mutual": self.mutual is not None, "born_again": self.born_again is not None,
                    "exits": self.exits is not None, "netaug": self.netaug is not None,
                    "on_policy": self.on_policy is not None, "train.lora": self.train.lora is not None,
                    "teacher_cache.enabled": self.teacher_cache is not None and self.teacher_cache.enabled}
            for key, on in used.items():
                if on:
                    raise ConfigError(
                        f"roles ({', '.join(self.roles)}) trains the student against further frozen models in a plain run; "
                        f"{key} is not combined with it: set {key}=null (or roles={{}})"
                    )

    @property
    def samples(self) -> TeacherSamplesConfig | None:
        """The teacher-samples settings when the data reads them, else None."""
        if TEACHER_SAMPLES not in (self.data.source, *self.data.mix):
            return None
        return self.teacher_samples or TeacherSamplesConfig()

    def _check_teacher_samples(self) -> None:
        sources = (self.data.source, *self.data.mix)
        if self.samples is None:
            if self.teacher_samples is not None:
                raise ConfigError(f"teacher_samples is set but the data does not read it; add {TEACHER_SAMPLES} to data.mix "
                                  f"(or make it data.source), or set teacher_samples=null")
            return
        if self.samples.prompts == CORPUS and all(s == TEACHER_SAMPLES for s in sources):
            raise ConfigError(f"teacher_samples.prompts=corpus takes its prompts from the data's other sources, and "
                              f"data.source={self.data.source!r} with data.mix={self.data.mix} has none; add a corpus to "
                              "data.mix, or set teacher_samples.prompts to none or a prompt file")

    def _check_mutual(self) -> None:
        check_mutual(lora=self.train.lora is not None, on_policy=self.on_policy is not None,
                     teacher_cache=self.teacher_cache is not None and self.teacher_cache.enabled)
        for i, source in enumerate(self.mutual.sources):
            if source == self.teacher.source:
                raise ConfigError(f"mutual.sources[{i}]={source!r} is the teacher itself; give another model folder")


def load_recipe_config(path: str | Path | None, overrides: list[str] | None = None) -> PruneDistillConfig:
    """The recipe config from a YAML file with ``a.b=c`` overrides applied."""
    return load_config(PruneDistillConfig, path, overrides)


# Fields that may change between a checkpoint and the run resuming from it.
RESUMABLE_CHANGES = (
    "run_name",
    "output_root",
    "train.max_steps",
    "train.max_minutes",
    "train.time_probe_steps",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.log_with",
    "train.progress_bar",
    "train.process_group_timeout_minutes",
    "prune.device",
    "eval",
    "hub",
    "push_to_hub",
    "export",
    "data.num_proc",
    "report",
    "report_new_tokens",
    "config_file",
)


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A saved or current config dict with its ``loss`` in one form: the enabled terms under ``loss.terms`` (a
    checkpoint written with the earlier ``loss.logits`` / ``loss.extra`` form compares equal to the same terms)."""
    loss = config.get("loss")
    if not isinstance(loss, dict):
        return config
    try:
        parsed = DistillLossConfig.from_dict(loss, prefix="loss.")
    except ConfigError:
        return config
    terms = {name: settings.to_dict() for name, settings in parsed.terms.items() if settings.weight > 0}
    return {**config, "loss": {**parsed.to_dict(), "terms": terms}}


def incompatible_fields(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, except those a resume may change."""
    if not prefix:
        saved, current = comparable(saved), comparable(current)
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if any(dotted == r or dotted.startswith(r + ".") for r in RESUMABLE_CHANGES):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += incompatible_fields(a, b, dotted + ".")
        elif a != b:
            out.append(dotted)
    return out

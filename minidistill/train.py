"""Prune a teacher (or load a pruned student), distill the student against the frozen teacher, save it.

Public entry of the trainer: :func:`run_prune_distill` runs the whole recipe from a
:class:`~minidistill.recipe_config.PruneDistillConfig`; :class:`Distiller` (the loop) and
:class:`DistillObjective` are usable on their own. Inputs are checked before any long computation:
sequence length against the models' maximum, teacher/student vocabularies, layer pairing for feature
losses, and on resume the checkpoint's config against the current one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from .training import placement
from .config import ConfigError
from .adapters import get_adapter
from .data import TEACHER_SAMPLES, build_text_data
from .distill.born_again import generation_dir
from .distill.mutual import peer_name
from .distill.objective import DistillLossConfig, DistillObjective
from .distill.teacher_cache import TeacherCache, build_teacher_cache
from .distill.teacher_samples import (finish_samples_folder, open_samples_folder, prompts_for, read_teacher_samples,
                                      write_teacher_samples)
from .models import ModelConfig, ModelError, load_model, load_model_and_tokenizer, load_tokenizer, resolve_source
from .prune.prune_map import PRUNE_MAP_FILENAME, PruneMap
from .recipe_config import PruneDistillConfig, incompatible_fields
from .training.checkpoint import CheckpointError, latest_checkpoint, resumable_checkpoint, verify_checkpoint
from .training.export import copy_folder, export_student
from .training.loop import CHECKPOINTS, Distiller, NonFiniteLossError, TrainResult, build_accelerator, resolve_precision

logger = logging.getLogger(__name__)

STUDENT_INIT = "student_init"
MODEL_DIR = "model"
REPORT_SPEED = {"batch_size": 1, "seq_len": 64, "new_tokens": 8, "repeats": 2}
""":func:`~minidistill.publish.report.measure_speed` settings of the run report (teacher and distilled model):
8 s for the bundled 135M teacher on 2 CPU cores (up to ~20 s while other work shares them), less for its
pruned student."""

__all__ = [
    "CheckpointError",
    "DistillObjective",
    "Distiller",
    "NonFiniteLossError",
    "RecipeResult",
    "TrainResult",
    "check_gguf_exportable",
    "check_pairing_possible",
    "check_seq_len",
    "check_same_vocabulary",
    "resolve_resume",
    "run_prune_distill",
    "student_init_dir",
]


@dataclass
class RecipeResult:
    """Where the recipe put its outputs, and the final numbers."""

    run_dir: Path
    model_dir: Path
    train: TrainResult


# ---------------------------------------------------------------------------------------------- checks


def check_seq_len(model_cfg: ModelConfig, seq_len: int, role: str) -> None:
    """ConfigError when ``data.seq_len`` exceeds the model's ``max_position_embeddings`` (read from config only)."""
    config = AutoConfig.from_pretrained(
        resolve_source(model_cfg.source), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the {role}'s max_position_embeddings={limit} ({model_cfg.source}); "
            f"set data.seq_len<={limit}"
        )


def _align(teacher_rows: int, student_rows: int, teacher_tok, student_tok):
    from .distill.pairing import PairingError, align_vocabularies

    try:
        return align_vocabularies(teacher_rows, student_rows, teacher_tok.get_vocab(), student_tok.get_vocab())
    except PairingError as e:
        raise ModelError(str(e)) from None


def check_same_vocabulary(teacher, teacher_tok, student, student_tok):
    """The heads' :class:`~minidistill.distill.pairing.VocabAlignment`; ModelError when teacher and student do not
    share a tokenizer or a head is more than the tokenizer plus padding rows."""
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    s_rows = student.get_output_embeddings().weight.shape[0]
    return _align(t_rows, s_rows, teacher_tok, student_tok)


def check_pairing_possible(loss: DistillLossConfig, prune_map: PruneMap | None) -> None:
    """ConfigError when a feature term with a ``pairing`` pairs layers by prune map but the student has none."""
    if prune_map is not None:
        return
    for section in loss.features().values():
        pairing, key = getattr(section, "pairing", None), section.key
        if pairing is not None and pairing.strategy == "prune_map":
            raise ConfigError(
                f"{key} pairs layers by the prune map, but the student has no {PRUNE_MAP_FILENAME} from this "
                f"teacher; set {key}.pairing.strategy=explicit with {key}.pairing.explicit=[[s, t], ...] "
                f"(or uniform / last_k), or {key}.weight=0"
            )


def check_gguf_exportable(model_cfg: ModelConfig) -> None:
    """UnsupportedArchitectureError naming ``export.gguf`` when llama.cpp cannot run the model (config only)."""
    from .adapters import UnsupportedArchitectureError
    from .publish.export_gguf import check_exportable

    config = AutoConfig.from_pretrained(
        resolve_source(model_cfg.source), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    try:
        check_exportable(config)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"export.gguf: {e}; or set export.gguf=null") from None


def _prune_map_for(student_dir: str, teacher) -> PruneMap | None:
    """The student's prune map, verified against this teacher and the student's folder; None when it has none.

    A map that does not fit (another teacher, edited indices, a shape the student's config.json
    contradicts, weights that are not its slices) is a PruneMapError naming the file and the fix
    (:func:`minidistill.prune.save.verify_student_map`).
    """
    from .prune.save import verify_student_map

    folder = Path(resolve_source(student_dir))
    if not (folder / PRUNE_MAP_FILENAME).is_file():
        return None
    return verify_student_map(teacher, folder)


def resolve_resume(cfg: PruneDistillConfig, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from, verified and checked against ``cfg``.

    ``True`` / ``"latest"``: the newest complete checkpoint of the run (damaged newer ones are skipped
    with a warning naming what is wrong); a path: that checkpoint, refused when it is damaged.
    """
    if resume in (None, False):
        return None
    if resume is True or resume == "latest":
        root = checkpoint_root(cfg)
        if latest_checkpoint(root) is None and generations_done(cfg) > 0:
            return None  # the next born-again generation starts fresh
        path = resumable_checkpoint(root)  # skips damaged ones with a warning
    else:
        path = Path(resume)
    saved = verify_checkpoint(path).get("config", {})
    bad = incompatible_fields(saved, cfg.to_dict())
    if bad:
        raise CheckpointError(
            f"cannot resume from {path}: the config differs in {', '.join(bad)} "
            f"(e.g. {bad[0]}: checkpoint {_lookup(saved, bad[0])!r}, now {_lookup(cfg.to_dict(), bad[0])!r})"
        )
    return path


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


# ---------------------------------------------------------------------------------------------- recipe


def student_init_dir(cfg: PruneDistillConfig) -> Path:
    """Where the pruned student of a run is kept (``prune.output_dir``, else ``<run_dir>/student_init``)."""
    if cfg.prune is not None and cfg.prune.output_dir:
        return Path(cfg.prune.output_dir)
    return cfg.run_dir / STUDENT_INIT


def _load_student(cfg: PruneDistillConfig, teacher, tokenizer, data, accelerator, continuing: bool, teacher_cache=None):
    """(student, prune_map): from ``student.source``, from the run's saved pruned student, or by pruning.

    Every process takes part in pruning (each runs the calibration pass on its share of the blocks, the
    statistics are summed over processes: :mod:`minidistill.prune.distributed`); the main process saves
    the student (with its prune map) to :func:`student_init_dir`, and every process then loads that
    folder, so all ranks start from the same weights, and a resumed run rebuilds the same architecture
    without pruning again.
    """
    if cfg.student is not None:
        student = load_model(cfg.student)
        return student, _prune_map_for(cfg.student.source, teacher)
    init_dir = student_init_dir(cfg)
    saved = (init_dir / "config.json").is_file() and (init_dir / PRUNE_MAP_FILENAME).is_file()
    if continuing and not saved:
        raise CheckpointError(f"{init_dir} is missing: the pruned student of this run cannot be rebuilt for resuming")
    if not continuing:
        from .prune.distributed import CalibrationShard
        from .prune.pipeline import prune_model

        prune_cfg = cfg.prune.replace(output_dir=str(init_dir), overwrite=True)
        result = prune_model(teacher, tokenizer, data, prune_cfg, teacher_source=cfg.teacher.source,
                             shard=CalibrationShard.from_accelerator(accelerator), device=accelerator.device,
                             teacher_cache=teacher_cache, collective_timeout_s=cfg.train.process_group_timeout_minutes * 60)
        if accelerator.is_main_process:
            logger.info(
                "pruned %s -> %s parameters; student saved to %s", result.params_before, result.params_after, init_dir
            )
        del result
        accelerator.wait_for_everyone()
    else:
        logger.info("using the pruned student saved in %s", init_dir)
    return load_model(ModelConfig(source=str(init_dir), dtype=cfg.teacher.dtype)), _prune_map_for(str(init_dir), teacher)


def peer_dir(run_dir: Path, index: int) -> Path:
    """Where peer ``index`` (>= 1) of a mutual learning run is exported."""
    return run_dir / f"{MODEL_DIR}_{peer_name(index)}"


def role_dir(run_dir: Path, name: str) -> Path:
    """Where the trained role ``name`` is exported."""
    return run_dir / f"{MODEL_DIR}_{name}"


def trained_role_names(cfg: PruneDistillConfig) -> list[str]:
    """The roles of ``cfg.roles`` that train with the student, in config order."""
    return [name for name, role in cfg.roles.items() if role.trainable]


def check_peer_sources(cfg: PruneDistillConfig, teacher_rows: int, tokenizer) -> None:
    """ModelError naming ``mutual.sources[i]`` when a peer folder is missing or does not share the teacher's vocabulary."""
    for i, source in enumerate(cfg.mutual.sources if cfg.mutual is not None else []):
        key = f"mutual.sources[{i}]={source!r}"
        try:
            peer_cfg = AutoConfig.from_pretrained(resolve_source(source))
            peer_tok = load_tokenizer(source)
        except (OSError, ValueError, ModelError) as e:
            raise ModelError(f"{key}: not a model folder with a config and tokenizer ({e})") from None
        try:
            _align(teacher_rows, int(getattr(peer_cfg, "vocab_size", 0) or 0), tokenizer, peer_tok)
        except ModelError as e:
            raise ModelError(f"{key}: peers share the teacher's vocabulary, but {e}") from None
        check_seq_len(ModelConfig(source=source), cfg.data.seq_len, f"peer mutual.sources[{i}]")


def load_peers(cfg: PruneDistillConfig, student, teacher) -> tuple[list, list[PruneMap | None]]:
    """The peers of a mutual learning run and their prune maps: ``mutual.copies`` copies of ``student`` (perturbed by
    ``mutual.noise``), then the models of ``mutual.sources``; ``([], [])`` without ``mutual``."""
    from .distill.mutual import perturbed_copy

    if cfg.mutual is None:
        return [], []
    m = cfg.mutual
    student_map = _prune_map_for(cfg.student.source, teacher) if cfg.student is not None else _prune_map_for(
        str(student_init_dir(cfg)), teacher)
    peers = [perturbed_copy(student, m.noise, seed=cfg.train.seed + i) for i in range(1, m.copies + 1)]
    maps = [student_map] * m.copies
    for source in m.sources:
        peers.append(load_model(ModelConfig(source=source, dtype=cfg.teacher.dtype)))
        maps.append(_prune_map_for(source, teacher))
    return peers, maps


def finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a finished run (its exported model)."""
    return (run_dir / MODEL_DIR / "training_metadata.json").is_file()


def generations_done(cfg: PruneDistillConfig) -> int:
    """Born-again generations of the run already finished (0 without ``born_again``)."""
    if cfg.born_again is None:
        return 0
    done = 0
    while done <= cfg.born_again.generations and finished(generation_dir(cfg.run_dir, done)):
        done += 1
    return done


def checkpoint_root(cfg: PruneDistillConfig) -> Path:
    """Where the run's training checkpoints are: ``<run_dir>/checkpoints``, or the current born-again generation's."""
    if cfg.born_again is None:
        return cfg.run_dir / CHECKPOINTS
    return generation_dir(cfg.run_dir, min(generations_done(cfg), cfg.born_again.generations)) / CHECKPOINTS


def resolve_auto_resume(cfg: PruneDistillConfig) -> tuple[PruneDistillConfig, str | None]:
    """``--resume auto``: continue an unfinished run, start a fresh one, never overwrite a finished one.

    A finished run keeps its folder; the new run gets the next free name ``<run_name>-2``, ``-3``, ...
    """
    if finished(cfg.run_dir):
        n = 2
        while (Path(cfg.output_root) / f"{cfg.run_name}-{n}").exists():
            n += 1
        new = cfg.replace(run_name=f"{cfg.run_name}-{n}")
        logger.warning("%s holds a finished run and is kept; this run writes to %s", cfg.run_dir, new.run_dir)
        return new, None
    if latest_checkpoint(checkpoint_root(cfg)) is not None or generations_done(cfg) > 0:
        logger.info("resuming the unfinished run in %s from its latest checkpoint", cfg.run_dir)
        return cfg, "latest"
    return cfg, None


def check_outputs_and_inputs(cfg: PruneDistillConfig, continuing: bool) -> None:
    """Checks of the run's folders, data and Hub settings that need no model: run before the teacher is loaded.

    The run folder must be writable and apart from the model folders read; a ``prune.output_dir``
    that is not empty must hold this run's own saved student (same teacher, same prune settings),
    else the user's files there are kept and the run is refused; the data file must be readable;
    ``push_to_hub`` needs a token and online mode.
    """
    from .data import check_data_source
    from .errors import OutputError
    from .prune.pipeline import check_output_dir, check_writable

    sources = tuple(m.source for m in (cfg.teacher, cfg.student) if m is not None)
    check_output_dir(cfg.run_dir / MODEL_DIR, True, sources=sources)  # also: run folder under a file, or not writable
    if cfg.student is None and not continuing:
        init_dir = student_init_dir(cfg)
        check_output_dir(init_dir, True, sources=sources)
        if init_dir.is_dir() and any(init_dir.iterdir()) and not _own_student_init(cfg, init_dir):
            raise OutputError(
                f"prune.output_dir={init_dir} is not empty and does not hold this run's pruned student; its files "
                "are kept: choose an empty or new folder for prune.output_dir (or unset it to use "
                f"{cfg.run_dir / STUDENT_INIT})"
            )
        check_writable(init_dir)
    check_data_source(cfg.data)
    if cfg.push_to_hub:
        from huggingface_hub import constants

        from .publish.hub import HubError, resolve_token

        resolve_token()
        if constants.is_offline_mode():
            raise HubError("push_to_hub=true but HF_HUB_OFFLINE is set: unset it, or set push_to_hub=false and push later with recipes/push.py")


def _own_student_init(cfg: PruneDistillConfig, init_dir: Path) -> bool:
    """True when ``init_dir`` holds a student this recipe saved from this teacher with these prune settings."""
    import json

    try:
        saved_prune = json.loads((init_dir / "prune_config.json").read_text())
        saved_teacher = json.loads((init_dir / PRUNE_MAP_FILENAME).read_text()).get("teacher", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return False
    expected = json.loads(json.dumps(cfg.prune.replace(output_dir=str(init_dir), overwrite=True).to_dict()))
    if isinstance(saved_prune, dict):  # prune.device does not change the student
        saved_prune.pop("device", None)
    expected.pop("device", None)
    return saved_prune == expected and saved_teacher == cfg.teacher.source


def run_prune_distill(cfg: PruneDistillConfig, *, resume: str | bool | None = None) -> RecipeResult:
    """Run the recipe step by step: checks, teacher, data, student (pruned or given), distillation, publishing.

    ``resume``: None (fresh run), ``"latest"`` / True, a checkpoint path, or ``"auto"``
    (:func:`resolve_auto_resume`).
    """
    from .publish.report import StageTimer

    cfg, resume_path, continuing = check_run(cfg, resume)
    timer = StageTimer()
    accelerator = build_accelerator(cfg.train, cfg.run_dir)
    teacher, tokenizer = load_teacher(cfg, accelerator, timer)
    roles = load_roles(cfg, teacher, tokenizer, accelerator, timer)  # loaded once; the trained ones train from here
    check_student_inputs(cfg, teacher, tokenizer)
    generated = write_samples(cfg, teacher, tokenizer, accelerator, timer)
    with timer.stage("data"):
        data = build_text_data(cfg.data, tokenizer, generated)
    correct_teacher(cfg, teacher, tokenizer, data, accelerator, timer)
    cache = None
    if search_reads_cache(cfg, continuing):  # the short-distillation ranking of candidates reads it too
        rows = teacher.get_output_embeddings().weight.shape[0]
        cache = build_cache(cfg, teacher, tokenizer, data, accelerator, _align(rows, rows, tokenizer, tokenizer).mask_from, timer)
    student, prune_map, alignment = prune_or_load_student(cfg, teacher, tokenizer, data, accelerator, continuing, timer,
                                                          teacher_cache=cache)
    if cache is None:
        cache = build_cache(cfg, teacher, tokenizer, data, accelerator, alignment.mask_from, timer)
    with placement.full_weights_init(accelerator):
        peers, peer_maps = load_peers(cfg, student, teacher)
    for peer_map in peer_maps:
        check_pairing_possible(cfg.loss, peer_map)
    fit = functools.partial(_fit, cfg, data=data, accelerator=accelerator, vocab_size=alignment.mask_from, tokenizer=tokenizer,
                            timer=timer, roles=roles)
    if cfg.born_again is None:
        result, metadata = fit(student=student, teacher=teacher, prune_map=prune_map, run_dir=cfg.run_dir, resume=resume_path,
                               cache=cache, peers=peers, peer_maps=peer_maps, export_prune_map=prune_map)
    else:
        result, metadata = _fit_generations(cfg, fit, student=student, teacher=teacher, prune_map=prune_map,
                                            resume=resume_path, accelerator=accelerator, cache=cache)
    model_dir = cfg.run_dir / MODEL_DIR
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish(cfg, model_dir, teacher, tokenizer, data, metadata, result, timer)
    accelerator.wait_for_everyone()
    return RecipeResult(run_dir=cfg.run_dir, model_dir=model_dir, train=result)


def check_run(cfg: PruneDistillConfig, resume: str | bool | None) -> tuple[PruneDistillConfig, Path | None, bool]:
    """The checks that need no model: config, resume state, folders, data files, lengths, export.

    Returns the config (renamed by ``--resume auto`` when its run had finished), the checkpoint to resume from,
    and whether an earlier process of the run already pruned the student.
    """
    cfg.validate()
    if resume == "auto":
        cfg, resume = resolve_auto_resume(cfg)
    resume_path = resolve_resume(cfg, resume)
    if resume_path is None and resume in (None, False) and (
            latest_checkpoint(checkpoint_root(cfg)) is not None or generations_done(cfg) > 0):
        raise CheckpointError(
            f"{cfg.run_dir} already holds checkpoints; pass --resume to continue that run, or choose another "
            "run_name (or delete the folder) to start over"
        )
    if resume_path is None and finished(cfg.run_dir):
        raise CheckpointError(f"{cfg.run_dir} holds a finished run; choose another run_name (or pass --resume auto)")
    continuing = resume_path is not None or generations_done(cfg) > 0
    check_born_again_pairing(cfg)
    check_outputs_and_inputs(cfg, continuing)
    if cfg.student is None and not continuing:
        from .prune.pipeline import resolve_prune_device

        resolve_prune_device(cfg.prune.device)  # a named device this machine lacks fails before any loading
    check_seq_len(cfg.teacher, cfg.data.seq_len, "teacher")
    for name, role in cfg.roles.items():
        check_seq_len(role, cfg.data.seq_len, f"roles.{name}")
    if cfg.student is not None:
        check_seq_len(cfg.student, cfg.data.seq_len, "student")
    if cfg.export.gguf is not None:
        check_gguf_exportable(cfg.student or cfg.teacher)
    return cfg, resume_path, continuing


def load_teacher(cfg: PruneDistillConfig, accelerator, timer):
    """(teacher, tokenizer), with full weights on every process; the tokenizer checked for GGUF export if asked."""
    with timer.stage("load teacher"), placement.full_weights_init(accelerator):  # ZeRO-3 would partition at load
        teacher, tokenizer = load_model_and_tokenizer(cfg.teacher)
    if cfg.export.gguf is not None:  # before pruning and training, not after them
        from .publish.export_gguf import check_tokenizer_exportable

        try:
            check_tokenizer_exportable(tokenizer)
        except ModelError as e:
            raise ModelError(f"export.gguf: {e}; or set export.gguf=null") from None
    return teacher, tokenizer


def load_roles(cfg: PruneDistillConfig, teacher, tokenizer, accelerator, timer) -> dict[str, Any]:
    """The further models of ``cfg.roles`` by name (frozen and trained), full weights on every process; ModelError when
    one does not share the teacher's tokenizer."""
    roles = {}
    for name, role in cfg.roles.items():
        with timer.stage(f"load {name}"), placement.full_weights_init(accelerator):
            model, role_tok = load_model_and_tokenizer(ModelConfig(**{f.name: getattr(role, f.name)
                                                                      for f in dataclasses.fields(ModelConfig)}))
        vocab, role_vocab = tokenizer.get_vocab(), role_tok.get_vocab()
        if role_vocab != vocab:
            differing = sum(1 for tok, i in vocab.items() if role_vocab.get(tok) != i)
            raise ModelError(
                f"roles.{name}.source={role.source}: its tokenizer differs from the teacher's ({differing} of {len(vocab)} "
                f"teacher tokens missing or renumbered); a further role must share the teacher's tokenizer (set "
                f"roles.{name}.tokenizer=<teacher source> when only its tokenizer files are wrong)"
            )
        rows = (teacher.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
        if rows[0] != rows[1]:
            raise ModelError(
                f"roles.{name}.source={role.source}: its lm_head has {rows[1]} rows and the teacher's {rows[0]}; a further "
                "role needs the teacher's head size (the same model family and tokenizer)"
            )
        roles[name] = model
    return roles


def check_student_inputs(cfg: PruneDistillConfig, teacher, tokenizer) -> None:
    """Checks of a given student and the peers against the teacher, from their configs and tokenizers only."""
    if cfg.student is not None:
        student_tok = load_tokenizer(cfg.student.tokenizer or cfg.student.source, trust_remote_code=cfg.student.trust_remote_code)
        student_cfg_only = AutoConfig.from_pretrained(resolve_source(cfg.student.source), trust_remote_code=cfg.student.trust_remote_code)
        _align(teacher.get_output_embeddings().weight.shape[0], int(getattr(student_cfg_only, "vocab_size", 0) or 0),
               tokenizer, student_tok)
        check_pairing_possible(cfg.loss, _prune_map_for(cfg.student.source, teacher))
        if cfg.netaug is not None:
            from .distill.netaug import check_netaug

            check_netaug(_prune_map_for(cfg.student.source, teacher), f"student.source={cfg.student.source}")
        if cfg.exits is not None:
            from .distill.exits import check_exit_layers

            check_exit_layers(cfg.exits, get_adapter(student_cfg_only).shape(student_cfg_only)["num_layers"],
                              f"student.source={cfg.student.source}")
    check_peer_sources(cfg, teacher.get_output_embeddings().weight.shape[0], tokenizer)


def samples_dir(cfg: PruneDistillConfig) -> Path:
    """The folder of the run's teacher samples."""
    return Path(cfg.samples.path or cfg.run_dir / TEACHER_SAMPLES)


def write_samples(cfg: PruneDistillConfig, teacher, tokenizer, accelerator, timer) -> dict:
    """``{"teacher_samples": documents}`` when the data reads them (written once, shards spread over the processes,
    reused when complete), else ``{}``."""
    samples = cfg.samples
    if samples is None:
        return {}
    path = samples_dir(cfg)
    with timer.stage("teacher samples"):
        prompts = prompts_for(samples, cfg.data, tokenizer)
        if accelerator.is_main_process:
            open_samples_folder(samples, teacher, tokenizer, prompts, path)
        accelerator.wait_for_everyone()
        home = next(teacher.parameters()).device
        teacher.to(accelerator.device)
        write_teacher_samples(samples, teacher, tokenizer, prompts, path, rank=accelerator.process_index,
                              world=accelerator.num_processes)
        teacher.to(home)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            manifest = finish_samples_folder(samples, path)
            logger.info("teacher samples: %d samples, %d new tokens, written at %.0f tokens/s (%s)", samples.num_samples,
                        manifest["new_tokens"], manifest["tokens_per_second"], path)
        accelerator.wait_for_everyone()
        return {TEACHER_SAMPLES: read_teacher_samples(path)}


def correct_teacher(cfg: PruneDistillConfig, teacher, tokenizer, data, accelerator, timer) -> None:
    """Teacher correction (in place), when configured."""
    if cfg.teacher_correction is None or not cfg.teacher_correction.enabled:
        return
    from .teacher_correction import run_teacher_correction

    with timer.stage("teacher correction"):
        run_teacher_correction(cfg.teacher_correction, teacher, tokenizer, data, cfg.run_dir,
                               teacher_source=cfg.teacher.source, accelerator=accelerator)


def search_reads_cache(cfg: PruneDistillConfig, continuing: bool) -> bool:
    """Whether this run prunes with a short-distillation ranking and has a teacher cache for it to read."""
    return (cfg.teacher_cache is not None and cfg.teacher_cache.enabled and cfg.student is None and not continuing
            and cfg.prune.search.distill_steps > 0)


def prune_or_load_student(cfg: PruneDistillConfig, teacher, tokenizer, data, accelerator, continuing: bool, timer,
                          teacher_cache: TeacherCache | None = None):
    """(student, prune map, vocabulary alignment with the teacher), checked for the loss terms and modes.

    ``teacher_cache``: read by the budget search's short-distillation ranking when given."""
    with timer.stage("prune" if cfg.student is None and not continuing else "load student"):
        with placement.full_weights_init(accelerator):
            student, prune_map = _load_student(cfg, teacher, tokenizer, data, accelerator, continuing, teacher_cache)
    alignment = check_same_vocabulary(teacher, tokenizer, student, tokenizer)
    if cfg.exits is not None:
        from .distill.exits import check_exit_layers

        check_exit_layers(cfg.exits, get_adapter(student).shape(student.config)["num_layers"])
    check_pairing_possible(cfg.loss, prune_map)
    return student, prune_map, alignment


def build_cache(cfg: PruneDistillConfig, teacher, tokenizer, data, accelerator, vocab_size: int | None, timer) -> TeacherCache | None:
    """The teacher cache of ``data.train`` (built on the main process, resumable), when configured."""
    if cfg.teacher_cache is None or not cfg.teacher_cache.enabled:
        return None
    cache_dir = Path(cfg.teacher_cache.path or cfg.run_dir / "teacher_cache")
    with timer.stage("teacher cache"):
        if accelerator.is_main_process:
            build_teacher_cache(cfg.teacher_cache, teacher, data.train.input_ids, cache_dir,
                                tokenizer_vocab=tokenizer.get_vocab(), vocab_size=vocab_size)
        accelerator.wait_for_everyone()
        return TeacherCache(cache_dir)


def _fit(cfg: PruneDistillConfig, *, student, teacher, prune_map: PruneMap | None, run_dir: Path, resume: Path | None, cache,
         peers: list, peer_maps: list, export_prune_map: PruneMap | None, data, accelerator, vocab_size: int | None,
         tokenizer, timer, generation: int | None = None, roles: dict[str, Any] | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Distill ``student`` (and any peers) from ``teacher`` (and any further frozen ``roles``) in ``run_dir``, export to
    ``run_dir/model`` (peers next to it)."""
    distiller = Distiller(
        student=student,
        teacher=teacher,
        data=data,
        prune_map=prune_map,
        loss=cfg.loss,
        train=cfg.train,
        eval=cfg.eval,
        run_dir=run_dir,
        config_dict=cfg.to_dict(),
        accelerator=accelerator,
        run_name=cfg.run_name if generation is None else f"{cfg.run_name}-gen{generation}",
        vocab_size=vocab_size,
        teacher_cache=cache,
        on_policy=cfg.on_policy,
        mutual=cfg.mutual,
        peers=peers,
        peer_prune_maps=peer_maps,
        exits=cfg.exits,
        netaug=cfg.netaug,
        roles={name: m for name, m in (roles or {}).items() if not cfg.roles[name].trainable},
        trained_roles={name: m for name, m in (roles or {}).items() if cfg.roles[name].trainable},
    )
    stage = "distill" if generation is None else f"distill gen{generation}"
    with timer.stage(stage):
        result = distiller.run(resume=resume)
    metadata = {
        "teacher": cfg.teacher.source,
        **({"roles": {name: {"source": role.source, "trainable": role.trainable} for name, role in cfg.roles.items()}}
           if cfg.roles else {}),
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "final_eval": result.final_eval,
        "teacher_eval": result.teacher_eval,
        "losses": cfg.loss.weights(),
        "lora": cfg.train.lora is not None,
        "config": cfg.to_dict(),
    }
    if generation is not None:
        metadata["generation"] = generation
    with timer.stage("export"):
        export_student(
            accelerator, result.module, run_dir / MODEL_DIR, tokenizer=tokenizer, prune_map=export_prune_map,
            metadata=metadata, peft_model=distiller.peft_model,
        )
        for i, peer_map in enumerate(peer_maps, start=1):
            export_student(accelerator, result.module, peer_dir(run_dir, i), tokenizer=tokenizer, prune_map=peer_map,
                           metadata={**metadata, "peer": peer_name(i)}, role=f"peers.{i - 1}")
        for i, name in enumerate(trained_role_names(cfg)):  # the module's peers, in this order
            export_student(accelerator, result.module, role_dir(run_dir, name), tokenizer=tokenizer, prune_map=None,
                           metadata={**metadata, "role": name}, role=f"peers.{i}")
    return result, metadata


def _learned_from(cfg: PruneDistillConfig, generation: int) -> str:
    """What born-again ``generation`` learns from, in words."""
    if generation == 0:
        return "teacher"
    if cfg.born_again.ensemble and generation > 1:
        return f"mean of generations 0-{generation - 1}"
    return f"generation {generation - 1}"


def check_born_again_pairing(cfg: PruneDistillConfig) -> None:
    """ConfigError when a born-again run has a loss term that pairs layers by the prune map: generations after the
    first learn from a model of the student's own shape, which the map does not describe."""
    if cfg.born_again is None:
        return
    from .config import ConfigError

    try:
        check_pairing_possible(cfg.loss, None)
    except ConfigError as e:
        raise ConfigError(f"born_again: generations after the first learn from the previous generation, which has no "
                          f"prune map to pair layers with: {e}") from None


def _fit_generations(cfg: PruneDistillConfig, fit, *, student, teacher, prune_map: PruneMap | None, resume: Path | None,
                     accelerator, cache: TeacherCache | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Born-again generations 0 .. born_again.generations, each in its own folder; the last one's model is the run's.

    Finished generations are skipped (``resume`` is a checkpoint of the first unfinished one, or None); generation
    ``g >= 1`` starts from the pruned student or generation ``g - 1`` (``born_again.init``) and learns from
    generation ``g - 1``. Generation 0 learns from the teacher, so it alone reads the teacher ``cache``.
    """
    import gc

    from .config import ConfigError
    from .distill.objective import EnsembleTeacher

    if cfg.born_again.ensemble and placement.teacher_is_sharded(accelerator):
        raise ConfigError("born_again.ensemble=true runs the generations as replicas; launch with launch/ddp.yaml or "
                          "launch/zero2.yaml (or set born_again.ensemble=false)")
    init_source = cfg.student.source if cfg.student is not None else str(student_init_dir(cfg))
    # All finished but the run's model/ missing: the last generation resumes from its final checkpoint (no steps left).
    first = min(generations_done(cfg), cfg.born_again.generations)
    for g in range(first, cfg.born_again.generations + 1):
        gen_dir = generation_dir(cfg.run_dir, g)
        if g == 0:
            gen_student, gen_teacher, objective_map = student, teacher, prune_map
        else:
            previous = str(generation_dir(cfg.run_dir, g - 1) / MODEL_DIR)
            with placement.full_weights_init(accelerator):
                if cfg.born_again.ensemble:
                    gen_teacher = EnsembleTeacher([load_model(ModelConfig(source=str(generation_dir(cfg.run_dir, j) / MODEL_DIR),
                                                                          dtype=cfg.teacher.dtype)) for j in range(g)])
                else:
                    gen_teacher = load_model(ModelConfig(source=previous, dtype=cfg.teacher.dtype))
                source = init_source if cfg.born_again.init == "pruned" else previous
                gen_student = student if g == first and source == init_source else load_model(
                    ModelConfig(source=source, dtype=cfg.teacher.dtype))
            objective_map = None
        logger.info("born-again generation %d of %d: learns from %s", g, cfg.born_again.generations, _learned_from(cfg, g))
        result, metadata = fit(student=gen_student, teacher=gen_teacher, prune_map=objective_map, run_dir=gen_dir,
                               resume=resume if g == first else None, cache=cache if g == 0 else None, peers=[], peer_maps=[],
                               export_prune_map=prune_map, generation=g)
        if g < cfg.born_again.generations:
            # The next generation's checkpoints must hold only its own models and optimizer.
            accelerator.free_memory()
            del gen_student, gen_teacher, result
            gc.collect()
    last = generation_dir(cfg.run_dir, cfg.born_again.generations) / MODEL_DIR
    if accelerator.is_main_process:
        copy_folder(last, cfg.run_dir / MODEL_DIR)
    accelerator.wait_for_everyone()
    return result, metadata


def publish(cfg: PruneDistillConfig, model_dir: Path, teacher, tokenizer, data, metadata: dict,
                    result: TrainResult, timer) -> None:
    """Main process: resolved config, GGUF export, lm-eval tasks and report (when configured), the Hub push."""
    from .config import save_config
    from .publish.export_gguf import export_run

    save_config(cfg, cfg.run_dir / "config.yaml")
    if cfg.export.gguf is not None:
        with timer.stage("gguf"):
            gguf_path = export_run(cfg.export, model_dir, cfg.run_dir, teacher=cfg.teacher.source)
        logger.info("GGUF (%s): %s", cfg.export.gguf, gguf_path)
    distilled = None
    if cfg.eval.lm_eval is not None:
        from .evaluation.lm_eval_runner import run_lm_eval

        with timer.stage("lm-eval"):
            distilled = load_model(ModelConfig(source=str(model_dir)))
            table = run_lm_eval({"teacher": (teacher, tokenizer), "distilled": (distilled, tokenizer)}, cfg.eval.lm_eval, data=data)
            table.save(cfg.run_dir / "lm_eval")
    if cfg.report:
        with timer.stage("report"):
            distilled = distilled or load_model(ModelConfig(source=str(model_dir)))
            _write_run_report(cfg, model_dir, teacher, distilled, tokenizer, data, result, timer)
    if cfg.push_to_hub:
        from .publish.hub import push_to_hub
        from .publish.model_card import build_model_card, run_info_from_folder

        card = build_model_card(run_info_from_folder(model_dir, teacher_source=cfg.teacher.source))
        url = push_to_hub(model_dir, cfg.hub, card=card)
        logger.info("pushed to %s", url)


def _write_run_report(cfg: PruneDistillConfig, model_dir: Path, teacher, distilled, tokenizer, data, result: TrainResult,
                      timer) -> None:
    """metrics.json, report.md and loss.png: teacher, pruned and distilled models measured the same way.

    Besides ``data.source``'s held-out split (measured during training; re-measured here in float32 when training
    evaluated under autocast, so that the report gives what the saved float32 checkpoint scores), each ``data.mix``
    source's held-out split is measured here for all three models; the teacher's and the distilled model's speed
    with :data:`REPORT_SPEED`.
    """
    import platform
    import time

    import torch

    from .evaluation.generation import greedy_generations
    from .evaluation.perplexity import heldout_loss
    from .publish.report import eval_records, heldout_of, measure_speed, model_entry, read_log, write_report

    log_file = "log.jsonl"
    if cfg.born_again is None:
        first, last = eval_records(read_log(cfg.run_dir / log_file))
    else:  # teacher and pruned student from generation 0's log, the distilled model from the last generation's
        k = cfg.born_again.generations
        first, last = eval_records(read_log(generation_dir(cfg.run_dir, 0) / log_file))[0], eval_records(
            read_log(generation_dir(cfg.run_dir, k) / log_file))[1]
        log_file = str(generation_dir(Path("."), k) / log_file)
    pruned_dir = Path(resolve_source(cfg.student.source)) if cfg.student is not None else student_init_dir(cfg)
    pruned = load_model(ModelConfig(source=str(pruned_dir)))
    map_dir = next((d for d in (pruned_dir, model_dir) if (d / PRUNE_MAP_FILENAME).is_file()), None)
    pmap = PruneMap.load(map_dir) if map_dir is not None else None
    device = next(distilled.parameters()).device

    def heldout_sets(model) -> dict[str, Any]:
        return {source: heldout_loss(model, blocks.batches(cfg.eval.batch_size, cfg.eval.max_blocks), chunk_tokens=cfg.eval.chunk_tokens)
                for source, blocks in data.extra_heldout.items()}

    def main_heldout(model, logged: dict[str, Any]) -> dict[str, Any]:
        if resolve_precision(cfg.train.mixed_precision) == "no":
            return logged
        return heldout_loss(model.to(device), data.heldout.batches(cfg.eval.batch_size, cfg.eval.max_blocks),
                            chunk_tokens=cfg.eval.chunk_tokens)

    models = {}
    for name, model, logged, agreement in (
        ("teacher", teacher, heldout_of(first, "teacher_heldout"), None),
        ("pruned", pruned, heldout_of(first, "heldout"), first.get("top1_agreement")),
        ("distilled", distilled, heldout_of(last, "heldout"), last.get("top1_agreement")),
    ):
        heldout = main_heldout(model, logged)
        gens = greedy_generations(model.to(device), tokenizer, max_new_tokens=cfg.report_new_tokens)
        models[name] = model_entry(model, heldout=heldout, agreement=agreement, generations=gens)
        models[name]["heldout_sets"] = heldout_sets(model)
        if name != "pruned":
            models[name]["speed"] = measure_speed(model, **REPORT_SPEED)
    trained = [(peer_name(i), peer_dir(cfg.run_dir, i)) for i in range(1, cfg.mutual.num_peers if cfg.mutual is not None else 1)]
    trained += [(name, role_dir(cfg.run_dir, name)) for name in trained_role_names(cfg)]
    for name, folder in trained:  # the other students of a mutual run, the trained roles
        peer = load_model(ModelConfig(source=str(folder))).to(device)
        models[name] = model_entry(peer, heldout=heldout_of(last, f"{name}/heldout"), agreement=last.get(f"{name}/top1_agreement"),
                                   generations=greedy_generations(peer, tokenizer, max_new_tokens=cfg.report_new_tokens))
        models[name]["heldout_sets"] = heldout_sets(peer)
    generations = []
    for g in range(cfg.born_again.generations + 1 if cfg.born_again is not None else 0):
        gen_dir = generation_dir(cfg.run_dir, g)
        final = eval_records(read_log(gen_dir / "log.jsonl"))[1]
        model = load_model(ModelConfig(source=str(gen_dir / MODEL_DIR))).to(device)
        generations.append({"generation": g, "learned_from": _learned_from(cfg, g),
                            "folder": str(gen_dir / MODEL_DIR), "heldout": heldout_of(final, "heldout"),
                            "heldout_sets": heldout_sets(model)})
        del model
    overrides = f" run_name={cfg.run_name}" if cfg.run_name != "demo" else ""
    metrics = {
        "run_name": cfg.run_name,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "device": f"{torch.cuda.get_device_name()}" if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "models": models,
        "candidates": (pmap.notes.get("search", {}).get("candidates") if pmap is not None else None) or [],
        "data": {"source": cfg.data.source, "mix": list(cfg.data.mix), "train_blocks": len(data.train),
                 "seq_len": cfg.data.seq_len},
        "teacher_samples": _samples_summary(cfg),
        "pruning": _pruning_summary(pmap, pruned_dir, cfg.run_dir),
        "training": {
            "steps": result.steps,
            "planned_steps": result.planned_steps,
            "stopped_by": result.stopped_by,
            "max_minutes": cfg.train.max_minutes,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 1),
            "tokens_per_second": result.tokens / result.seconds if result.seconds else None,
            "losses": cfg.loss.weights(),
        },
        "generations": generations,
        "exits": _exit_entries(cfg, model_dir, last, heldout_sets, device),
        "stage_seconds": {k: round(v, 1) for k, v in timer.seconds.items()},
        "commands": {
            "reproduce": f"accelerate launch recipes/prune_distill.py --config {cfg.config_file or '<config.yaml>'}{overrides}",
            "load": (
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r})"
            ),
        },
    }
    write_report(cfg.run_dir, metrics, log_file=log_file)


def _samples_summary(cfg: PruneDistillConfig) -> dict[str, Any] | None:
    """The teacher samples' size and generation throughput from their manifest (None when the data reads none)."""
    if cfg.samples is None:
        return None
    manifest = json.loads((samples_dir(cfg) / "manifest.json").read_text())
    return {"folder": str(samples_dir(cfg)), "prompts": cfg.samples.prompts, **{k: manifest.get(k) for k in (
        "num_samples", "num_prompts", "max_new_tokens", "temperature", "top_p", "top_k", "new_tokens", "seconds",
        "tokens_per_second")}}


def _exit_entries(cfg: PruneDistillConfig, model_dir: Path, last: dict[str, Any], heldout_sets, device) -> list[dict[str, Any]]:
    """Each early exit of the distilled model: held-out numbers (training's last evaluation, and each extra held-out
    set measured on the model that stops there) and that model's speed."""
    from .distill.exits import exit_layers, load_exit_model
    from .publish.report import heldout_of, measure_speed

    out = []
    for layer in exit_layers(model_dir) if cfg.exits is not None else []:
        model = load_exit_model(model_dir, layer).to(device)
        out.append({"layer": layer, "layers_run": layer + 1, "heldout": heldout_of(last, f"exit{layer}/heldout"),
                    "heldout_sets": heldout_sets(model), "speed": measure_speed(model, **REPORT_SPEED)})
        del model
    return out


def _pruning_summary(pmap: PruneMap | None, pruned_dir: Path, run_dir: Path) -> dict[str, Any]:
    """How the student was pruned, for the report: importance and layer methods, re-fitted parts, search facts.

    The search's sensitivity plot (saved with the pruned student) is copied next to the report.
    """
    import shutil

    from .prune.sensitivity import SENSITIVITY_PNG

    if pmap is None:
        return {}
    notes = pmap.notes or {}
    search = notes.get("search", {})
    plot = None
    if (pruned_dir / SENSITIVITY_PNG).is_file() and not (pruned_dir / SENSITIVITY_PNG).is_symlink():
        shutil.copyfile(pruned_dir / SENSITIVITY_PNG, run_dir / SENSITIVITY_PNG)
        plot = SENSITIVITY_PNG
    return {
        "sensitivity_plot": plot,
        "importance": pmap.importance.get("method"),
        "layer_method": pmap.importance.get("layer_method"),
        "kept_layers": list(pmap.kept_layers),
        "refit": len(pmap.refit),
        "reconstruction": notes.get("reconstruction"),
        "search": {k: v for k, v in search.items() if k != "candidates"} or None,
        "sensitivity": notes.get("sensitivity"),
    }

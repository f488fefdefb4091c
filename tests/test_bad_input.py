"""The bad-input catalogue: every case runs a real entry point as its own process on tiny models.

Each case asserts the exit code of its error kind (``minidistill.errors.EXIT_CODES``), that the one
``error [...]`` line names the problem, that no traceback is printed, and that nothing outside the
case's allowed output changed (every input folder is hashed before and after). The cheap cases run
through ``tests/bad_input/runner.py``, which forks each case from a parent that imported torch and
transformers once; the README's commands, ``accelerate launch`` and the SIGKILL fault run as fresh
interpreters. README.md's "What is checked" section lists :data:`CATEGORIES` and the exit codes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minidistill.errors import EXIT_CODES

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SCRIPTS = {
    "prune": REPO / "recipes" / "prune.py",
    "prune_distill": REPO / "recipes" / "prune_distill.py",
    "push": REPO / "recipes" / "push.py",
    "eval": REPO / "eval" / "run_lm_eval.py",
    "export_gguf": REPO / "recipes" / "export_gguf.py",
}
CODE = {kind: code for code, kind, _ in EXIT_CODES.values()}
TRACEBACK = "Traceback (most recent call last)"

# README "What is checked" categories, in the order they are listed there.
CATEGORIES = {
    "model": "model sources: missing folder, file instead of folder, folder without config.json, Hub id while offline, unsupported architecture (also for GGUF export), tokenizer mismatch",
    "output": "output folders: not empty, the source model itself (even with --overwrite), under a file, not writable, a user's folder as prune.output_dir, an existing GGUF file without --overwrite",
    "config": "config: YAML syntax / encoding / shape (named with file and line), unknown keys, non-finite lr, non-integer parameter counts, bad overrides, --resume followed by an override, feature terms paired by a missing prune map, an unknown GGUF type",
    "data": "data files: missing, empty, whitespace only, not UTF-8, a folder, unknown type, malformed JSON lines, missing column, offline Hub dataset, too little text",
    "target": "prune targets: budget above the teacher, shapes the architecture refuses",
    "cache": "teacher caches: k above the vocabulary, a cache built from another teacher, tokenizer or data; teacher samples made from another teacher or settings",
    "checkpoint": "checkpoints and run folders: resume without a checkpoint, an incomplete checkpoint, a truncated or empty trainer_state.json",
    "prune-map": "a given student's prune_map.json: not JSON, made from another teacher, student shape contradicting config.json, edited layer indices, an inconsistent map",
    "hub": "Hub push: no token, offline mode, not a finished folder, pickles, bad repo id",
    "fault": "faults: SIGKILL during the prune stage then a rerun that completes; non-finite loss",
}


@dataclass
class Case:
    """One bad input: which entry point, its arguments, the files it starts from, what must come out."""

    name: str
    script: str
    argv: list[str]
    code: int
    match: str
    category: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files created in the case folder first (``{case}`` in argv); a name ending in ``/`` is a folder."""
    env: dict[str, str | None] = field(default_factory=dict)
    may_write: tuple[str, ...] = ()
    """Paths under the case folder that the run may create (logs of a run that fails during training)."""
    copy: dict[str, str] = field(default_factory=dict)
    """Case-folder path -> shared fixture folder copied there first (then ``files`` and ``edit`` apply)."""
    edit: Callable[[Path], None] | None = None
    """Changes the copied inputs (e.g. an edited prune map), given the case folder."""


def _distill(*extra: str) -> list[str]:
    """A quick recipe run on the tiny teacher and its hand-pruned student, plus ``extra`` overrides."""
    base = {
        "run_name": "tiny", "output_root": "{case}/runs", "teacher.source": "{teacher}", "student.source": "{student}",
        "data.max_documents": 40, "data.seq_len": 32, "train.batch_size": 4, "train.max_steps": 2,
        "train.warmup_steps": 1, "train.progress_bar": False, "eval.max_blocks": 2,
    }
    return [f"{k}={v}" for k, v in base.items()] + list(extra)


PRUNE_STUDENT = ("student=null", "prune.target.num_layers=2", "prune.importance.cache=false", "prune.calib_blocks=4",
                 "prune.show_progress=false")
PRUNE_FAST = ["--seq_len", "32", "--max_documents", "40", "--calib_blocks", "4", "--eval_blocks", "2",
              "--multiple_of", "8", "--max_candidates", "2", "importance.cache=false", "search.score_blocks=2"]


def _prune(*extra: str, model: str = "{teacher}", output: str = "{case}/out") -> list[str]:
    return ["--model", model, "--output", output, *extra]


NON_UTF8 = "caf\u00e9 au lait\n".encode("latin-1") + b"second line of text here\n"
DOCS = "".join(f"document number {i} talks about the weather and the city council.\n" for i in range(20))
JSONL = "".join(json.dumps({"text": f"doc {i} words here"}) + "\n" for i in range(10))
def _edit_map(**changes):
    def edit(case_dir: Path) -> None:
        path = case_dir / "student" / "prune_map.json"
        data = json.loads(path.read_text())
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split(".")
            for p in parents:
                node = node[p]
            node[last] = value
        path.write_text(json.dumps(data))
    return edit


def _edit_config(**changes):
    def edit(case_dir: Path) -> None:
        path = case_dir / "student" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _checkpoint_files(state: str) -> dict[str, str]:
    """A checkpoint folder whose manifest is intact but whose trainer_state.json is cut off."""
    files = {"model.safetensors": "weights", "trainer_state.json": state, "rng_state_0.json": "{}",
             "rng_state_0.safetensors": "rng"}
    manifest = {"format": "minidistill-checkpoint", "version": 1, "step": 2, "num_processes": 1,
                "files": {k: {"size": len(v.encode())} for k, v in files.items()}}
    return {f"ckpt/step-2/{k}": v for k, v in {**files, "manifest.json": json.dumps(manifest)}.items()}


# config.json of a gemma3 model: an adapter-table architecture that llama.cpp cannot run once depth-pruned.
GEMMA3_CONFIG = json.dumps({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
                            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 256})

SHORT_LLAMA_CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                 "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 32})

HUB_ENV = {"HF_TOKEN": None, "HF_HUB_OFFLINE": "0"}  # no token anywhere (HF_HOME is the case's empty folder)

CASES: list[Case] = [
    # ------------------------------------------------------------------ model sources
    Case("prune_model_missing_folder", "prune", _prune("--num_layers", "2", model="{case}/no/such/model"), 8,
         r"no such folder: .*no/such/model", "model"),
    Case("prune_model_folder_without_config", "prune", _prune("--num_layers", "2", model="{case}/empty"), 8,
         r"empty is not a model folder \(no config\.json\)", "model", files={"empty/": ""}),
    Case("prune_model_is_a_file", "prune", _prune("--num_layers", "2", model="{case}/model.txt"), 8,
         r"model\.txt is a file, not a model folder", "model", files={"model.txt": "x"}),
    Case("prune_model_hub_id_offline", "prune", _prune("--num_layers", "2", model="someone/some-model"), 8,
         r"no such folder: someone/some-model.*offline mode is on \(HF_HUB_OFFLINE=1\)", "model"),
    Case("prune_unsupported_architecture", "prune", _prune("--num_layers", "1", model="{gpt2}"), 7,
         r"gpt2", "model"),
    Case("prune_tokenizer_folder_missing", "prune", _prune("--num_layers", "2", "--tokenizer", "{case}/tok/none"), 8,
         r"no such folder: .*tok/none", "model"),
    Case("distill_teacher_missing", "prune_distill", _distill("teacher.source={case}/gone/teacher"), 8,
         r"no such folder: .*gone/teacher", "model"),
    Case("distill_student_missing", "prune_distill", _distill("student.source={case}/gone/student"), 8,
         r"no such folder: .*gone/student", "model"),
    Case("distill_student_tokenizer_differs", "prune_distill", _distill("student.source={student_tok}"), 8,
         r"tokenizers differ.*student\.tokenizer=", "model"),
    Case("distill_role_tokenizer_differs", "prune_distill",
         _distill("roles.teacher2.source={student_tok}", "loss.terms.kd2.term=logits", "loss.terms.kd2.target=teacher2"), 8,
         r"roles\.teacher2\.source=.*student_tok: its tokenizer differs from the teacher's", "model"),
    Case("distill_role_missing", "prune_distill",
         _distill("roles.teacher2.source={case}/gone/t2", "loss.terms.kd2.term=logits", "loss.terms.kd2.target=teacher2"), 8,
         r"no such folder: .*gone/t2", "model"),
    Case("distill_role_seq_len_too_long", "prune_distill",
         _distill("roles.teacher2.source={case}/short", "loss.terms.kd2.term=logits", "loss.terms.kd2.target=teacher2",
                  "data.seq_len=48"), 2,
         r"data\.seq_len=48 exceeds the roles\.teacher2's max_position_embeddings=32", "config",
         files={"short/config.json": SHORT_LLAMA_CONFIG}),
    Case("distill_unsupported_teacher", "prune_distill", _distill(*PRUNE_STUDENT, "teacher.source={gpt2}"), 7,
         r"gpt2", "model"),
    Case("distill_gguf_unsupported_architecture", "prune_distill",
         _distill("student.source={case}/gemma", "export.gguf=q8_0"), 7,
         r"export\.gguf: GGUF export does not support model type 'gemma3_text' \(llama\.cpp fixes.*export\.gguf=null",
         "model", files={"gemma/config.json": GEMMA3_CONFIG}),
    Case("export_gguf_unsupported_architecture", "export_gguf", ["{case}/gemma", "--output", "{case}/m.gguf"], 7,
         r"GGUF export does not support model type 'gemma3_text'.*exportable: llama, mistral", "model",
         files={"gemma/config.json": GEMMA3_CONFIG}),
    Case("export_gguf_gpt2", "export_gguf", ["{gpt2}", "--output", "{case}/m.gguf"], 7, r"gpt2", "model"),
    Case("eval_model_missing", "eval", ["--model", "a={teacher}", "--model", "b={case}/no_model", "--limit", "2"], 8,
         r"no such folder: .*no_model", "model"),
    # ------------------------------------------------------------------ output folders
    Case("prune_output_is_model_with_overwrite", "prune", _prune("--num_layers", "2", "--overwrite", output="{teacher}"), 11,
         r"is \(or overlaps\) the source model folder .*refused even with overwrite", "output"),
    Case("prune_output_inside_model", "prune", _prune("--num_layers", "2", "--overwrite", output="{teacher}/pruned"), 11,
         r"overlaps\) the source model folder", "output"),
    Case("prune_output_not_empty", "prune", _prune("--num_layers", "2", output="{case}/mine"), 11,
         r"output folder .*mine exists and is not empty; pass overwrite \(--overwrite\)", "output",
         files={"mine/notes.txt": "keep me"}),
    Case("prune_output_is_a_file", "prune", _prune("--num_layers", "2", output="{case}/out.txt"), 11,
         r"out\.txt exists and is not a folder", "output", files={"out.txt": "keep"}),
    Case("prune_output_under_a_file", "prune", _prune("--num_layers", "2", output="{case}/out.txt/student"), 11,
         r"out\.txt is a file, not a folder", "output", files={"out.txt": "keep"}),
    Case("prune_output_not_writable", "prune", _prune("--num_layers", "2", output="/proc/minidistill-out"), 11,
         r"/proc is not writable", "output"),
    Case("distill_prune_output_dir_user_folder", "prune_distill",
         _distill(*PRUNE_STUDENT, "prune.output_dir={case}/precious"), 11,
         r"prune\.output_dir=.*precious is not empty and does not hold this run's pruned student; its files are kept", "output",
         files={"precious/config.json": "{}", "precious/thesis.tex": "years of work"}),
    Case("distill_prune_output_dir_is_teacher", "prune_distill", _distill(*PRUNE_STUDENT, "prune.output_dir={teacher}"), 11,
         r"overlaps\) the source model folder", "output"),
    Case("distill_student_in_run_model_folder", "prune_distill", _distill("student.source={case}/runs/tiny/model"), 11,
         r"runs/tiny/model is \(or overlaps\) the source model folder", "output", copy={"runs/tiny/model": "student"}),
    Case("distill_output_root_is_a_file", "prune_distill", _distill("output_root={case}/runs.txt"), 11,
         r"runs\.txt is a file, not a folder", "output", files={"runs.txt": "keep"}),
    Case("distill_output_root_not_writable", "prune_distill", _distill("output_root=/proc/minidistill-runs"), 11,
         r"/proc is not writable", "output"),
    Case("export_gguf_output_exists", "export_gguf", ["{student}", "--outtype", "f32", "--output", "{case}/m.gguf"], 11,
         r"m\.gguf exists; pass --overwrite to replace it", "output", files={"m.gguf": "keep me"}),
    Case("eval_output_under_a_file", "eval", ["--model", "a={teacher}", "--output_dir", "{case}/f.txt/eval"], 11,
         r"f\.txt is a file, not a folder", "output", files={"f.txt": "keep"}),
    # ------------------------------------------------------------------ config
    Case("distill_config_missing", "prune_distill", ["--config", "{case}/nope.yaml"], 2,
         r"config file .*nope\.yaml does not exist", "config"),
    Case("distill_config_yaml_syntax", "prune_distill", ["--config", "{case}/bad.yaml"], 2,
         r"config file .*bad\.yaml is not valid YAML at line 4, column 12", "config",
         files={"bad.yaml": "run_name: x\ntrain:\n  lr: [1e-4\n  max_steps: 3\n"}),
    Case("distill_config_not_a_mapping", "prune_distill", ["--config", "{case}/list.yaml"], 2,
         r"list\.yaml must hold a mapping at the top level", "config", files={"list.yaml": "- a\n- b\n"}),
    Case("distill_config_not_utf8", "prune_distill", ["--config", "{case}/latin.yaml"], 2,
         r"latin\.yaml is not UTF-8", "config", files={"latin.yaml": b"run_name: caf\xe9\n"}),
    Case("distill_config_unknown_key_in_file", "prune_distill", ["--config", "{case}/typo.yaml"], 2,
         r"unknown config key 'train\.max_step'; did you mean 'train\.max_steps'", "config",
         files={"typo.yaml": "train:\n  max_step: 3\n"}),
    Case("distill_unknown_override", "prune_distill", _distill("train.max_step=5"), 2,
         r"unknown config key 'train\.max_step'; did you mean 'train\.max_steps'", "config"),
    Case("distill_override_without_equals", "prune_distill", _distill("train.max_steps"), 2,
         r"override 'train\.max_steps' must look like key=value", "config"),
    Case("distill_override_bad_yaml", "prune_distill", _distill("loss.hidden.pairing.explicit=[[0,1]"), 2,
         r"override 'loss\.hidden\.pairing\.explicit=\[\[0,1\]': the value .*not valid YAML", "config"),
    Case("distill_lr_nan", "prune_distill", _distill("train.lr=nan"), 2, r"train\.lr='nan': must be a finite number", "config"),
    Case("distill_lr_inf", "prune_distill", _distill("train.lr=.inf"), 2, r"train\.lr=inf: must be a finite number", "config"),
    Case("distill_lr_negative", "prune_distill", _distill("train.lr=-1"), 2, r"train\.lr=-1\.0: must be a positive finite number", "config"),
    Case("distill_params_not_integer", "prune_distill", _distill(*PRUNE_STUDENT[:1], "prune.target.params=1234.5"), 2,
         r"target\.params=1234\.5: a parameter count must be a whole number", "config"),
    Case("distill_run_name_with_slash", "prune_distill", _distill("run_name=a/b"), 2,
         r"run_name='a/b': must be a plain folder name", "config"),
    Case("distill_student_is_teacher", "prune_distill", _distill("student.source={teacher}"), 2,
         r"is the teacher itself", "config"),
    Case("distill_resume_then_override", "prune_distill", ["--resume", "train.max_stepz=5", *_distill()], 2,
         r"unknown config key 'train\.max_stepz'; did you mean 'train\.max_steps'", "config"),
    Case("distill_seq_len_too_long", "prune_distill", _distill("data.seq_len=4096"), 2,
         r"data\.seq_len=4096 exceeds the teacher's max_position_embeddings=256", "config"),
    Case("distill_feature_loss_without_map", "prune_distill", _distill("student.source={student_nomap}", "loss.hidden.weight=1.0"), 2,
         r"loss\.hidden pairs layers by the prune map.*pairing\.strategy=explicit", "config"),
    Case("distill_extra_feature_loss_without_map", "prune_distill", _distill("student.source={student_nomap}", "loss.extra.nst=0.5"), 2,
         r"loss\.extra\.nst pairs layers by the prune map.*loss\.extra\.nst\.pairing\.strategy=explicit", "config"),
    Case("distill_term_names_a_missing_role", "prune_distill", _distill("loss.terms.kd.term=logits", "loss.terms.kd.target=peer"), 2,
         r"loss\.terms\.kd\.target='peer': no role of that name \(the roles: student, teacher\)", "config"),
    Case("distill_term_in_both_forms", "prune_distill", _distill("loss.terms.logits.ce_weight=0.5", "loss.logits.temperature=2"), 2,
         r"loss\.logits and loss\.terms\.logits both configure the term 'logits'", "config"),
    Case("export_gguf_unknown_outtype", "export_gguf", ["{student}", "--outtype", "q4_k", "--output", "{case}/m.gguf"], 2,
         r"--outtype 'q4_k': choose one of f32, f16, q8_0", "config"),
    Case("distill_push_without_repo", "prune_distill", _distill("push_to_hub=true"), 2,
         r"push_to_hub=true needs hub\.repo_id", "config"),
    Case("prune_params_not_integer", "prune", _prune("--target_params", "1234.5"), 2,
         r"target\.params=1234\.5: a parameter count must be a whole number", "config"),
    Case("prune_params_negative", "prune", _prune("--target_params", "-3"), 2, r"target\.params=-3\.0: must be a fraction", "config"),
    Case("prune_budget_and_shape", "prune", _prune("--target_params", "0.5", "--num_layers", "2"), 2,
         r"exclude each other", "config"),
    Case("prune_unknown_override", "prune", _prune("--target_params", "0.5", "search.scores=kl"), 2,
         r"unknown config key 'search\.scores'; did you mean 'search\.score'", "config"),
    Case("eval_unknown_task", "eval", ["--model", "a={teacher}", "--tasks", "minidistill_heldout_pp", "--limit", "2"], 2,
         r"unknown task 'minidistill_heldout_pp' \(did you mean minidistill_heldout_ppl", "config"),
    Case("eval_limit_zero", "eval", ["--model", "a={teacher}", "--limit", "0"], 2, r"lm_eval\.limit=0", "config"),
    # ------------------------------------------------------------------ data files
    Case("prune_calib_missing", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/corpus.txt"), 3,
         r"data file .*corpus\.txt does not exist", "data"),
    Case("prune_calib_empty", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/empty.txt"), 3,
         r"data file .*empty\.txt is empty", "data", files={"empty.txt": ""}),
    Case("prune_calib_whitespace", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/blank.txt"), 3,
         r"blank\.txt holds no non-empty document", "data", files={"blank.txt": "\n  \n\n"}),
    Case("prune_calib_not_utf8", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/latin.txt"), 3,
         r"data file .*latin\.txt is not UTF-8 text \(invalid byte at offset 3\)", "data", files={"latin.txt": NON_UTF8}),
    Case("prune_calib_is_a_folder", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/docs.txt"), 3,
         r"docs\.txt is a folder", "data", files={"docs.txt/": ""}),
    Case("prune_calib_unknown_type", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/docs.csv"), 3,
         r"docs\.csv: unknown file type '\.csv'", "data", files={"docs.csv": "a,b\n"}),
    Case("prune_calib_bad_json_line", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/docs.jsonl"), 3,
         r"docs\.jsonl line 3 is not valid JSON", "data", files={"docs.jsonl": '{"text": "a"}\n{"text": "b"}\n{"text": \n'}),
    Case("prune_calib_missing_column", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/docs.jsonl", "--text_column", "body", *PRUNE_FAST), 3,
         r"no column 'body'.*--text_column", "data", files={"docs.jsonl": JSONL}),
    Case("prune_calib_fake_parquet", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/docs.parquet"), 3,
         r"docs\.parquet is not a parquet file", "data", files={"docs.parquet": "text\n"}),
    Case("prune_calib_json_document_cut", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/docs.json"), 3,
         r"docs\.json is not valid JSON \(line 4, column 1", "data", files={"docs.json": '[\n{"text": "a"},\n{"text": "b"}\n'}),
    Case("prune_calib_json_lines_not_objects", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/nums.jsonl"), 3,
         r"nums\.jsonl line 1 holds a JSON int, not an object", "data", files={"nums.jsonl": "1\n2\n3\n"}),
    Case("prune_calib_text_not_strings", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/ints.jsonl"), 3,
         r"ints\.jsonl: column 'text' holds int64 values, not text", "data", files={"ints.jsonl": '{"text": 1}\n{"text": 2}\n'}),
    Case("prune_calib_truncated_parquet", "prune", _prune("--num_layers", "2", "--calib_data", "{case}/cut.parquet"), 3,
         r"data file .*cut\.parquet cannot be read as parquet", "data", files={"cut.parquet": b"PAR1\x15\x04garbage"}),
    Case("prune_calib_hub_dataset_offline", "prune", _prune("--num_layers", "2", "--calib_data", "some_dataset"), 3,
         r"'some_dataset' is no local file, and offline mode", "data"),
    Case("distill_data_missing", "prune_distill", _distill("data.source={case}/corpus.jsonl"), 3,
         r"data file .*corpus\.jsonl does not exist", "data"),
    Case("distill_data_not_utf8", "prune_distill", _distill("data.source={case}/latin.txt"), 3,
         r"latin\.txt is not UTF-8 text", "data", files={"latin.txt": NON_UTF8}),
    Case("distill_data_too_little", "prune_distill", _distill("data.source={case}/docs.txt", "data.seq_len=200"), 3,
         r"docs\.txt: the (train|heldout) split holds less than one sequence of 200 tokens", "data", files={"docs.txt": DOCS}),
    Case("eval_data_missing", "eval", ["--model", "a={teacher}", "--data_source", "{case}/held.txt"], 3,
         r"data file .*held\.txt does not exist", "data"),
    # ------------------------------------------------------------------ prune targets
    Case("prune_budget_above_teacher", "prune", _prune("--target_params", "5e9", *PRUNE_FAST), 4,
         r"exceeds the teacher", "target"),
    Case("prune_heads_not_multiple_of_kv", "prune", _prune("--num_heads", "3", *PRUNE_FAST), 4, r"not a multiple", "target"),
    # ------------------------------------------------------------------ teacher caches
    Case("distill_teacher_cache_k_above_vocab", "prune_distill", _distill("teacher_cache.enabled=true", "teacher_cache.k=100000"),
         12, r"teacher_cache\.k=100000 exceeds the vocabulary \(\d+ tokens\): set teacher_cache\.k<=\d+", "cache",
         may_write=("runs",)),
    Case("distill_teacher_cache_other_teacher", "prune_distill",
         _distill("teacher_cache.enabled=true", "teacher_cache.k=8", "teacher_cache.path={case}/cache"), 12,
         r"cache was built for another teacher \(weights sha256\).*set teacher_cache\.path to a new folder", "cache",
         may_write=("runs",), files={"cache/manifest.json": json.dumps({"format": 1, "teacher": "0" * 64, "complete": True})}),
    Case("distill_teacher_samples_other_teacher", "prune_distill",
         _distill("data.mix=[teacher_samples]", "teacher_samples.path={case}/samples", "teacher_samples.num_samples=4"), 12,
         r"teacher samples in .*samples were made from another teacher \(weights sha256\).*set teacher_samples\.path to a new folder",
         "cache", may_write=("runs",), files={"samples/manifest.json": json.dumps({"format": 1, "teacher": "0" * 64})}),
    # ------------------------------------------------------------------ checkpoints
    Case("distill_resume_without_checkpoint", "prune_distill", ["--resume", *_distill()], 6,
         r"--resume: no complete checkpoint under .*runs/tiny/checkpoints", "checkpoint"),
    Case("distill_resume_incomplete_checkpoint", "prune_distill", ["--resume", "{case}/ckpt/step-2", *_distill()], 6,
         r"ckpt/step-2 is not a complete checkpoint", "checkpoint", files={"ckpt/step-2/trainer_state.json": '{"step": 2, "conf'}),
    Case("distill_resume_truncated_trainer_state", "prune_distill", ["--resume", "{case}/ckpt/step-2", *_distill()], 6,
         r"step-2 is not a complete checkpoint: .*trainer_state\.json is not valid JSON", "checkpoint",
         files=_checkpoint_files('{"step": 2, "conf')),
    Case("distill_resume_empty_trainer_state", "prune_distill", ["--resume", "{case}/ckpt/step-2", *_distill()], 6,
         r"trainer_state\.json is not valid JSON \(empty\)", "checkpoint", files=_checkpoint_files("")),
    # ------------------------------------------------------------------ prune maps of a given student
    Case("distill_prune_map_not_json", "prune_distill", _distill("student.source={case}/student"), 5,
         r"student/prune_map\.json is not valid JSON", "prune-map", copy={"student": "student"},
         files={"student/prune_map.json": '{"kept_layers": [0, 2'}),
    Case("distill_prune_map_other_teacher", "prune_distill", _distill("teacher.source={teacher_b}"), 5,
         r"prune_map\.json: the student's weights are not the teacher slices the map names", "prune-map"),
    Case("distill_prune_map_shape_contradicts_config", "prune_distill", _distill("student.source={case}/student"), 5,
         r"student_shape contradicts .*config\.json", "prune-map", copy={"student": "student"},
         edit=_edit_config(intermediate_size=32)),
    Case("distill_prune_map_inconsistent", "prune_distill", _distill("student.source={case}/student"), 5,
         r"kept_neurons has 64 entries, expected 32; the file was edited", "prune-map", copy={"student": "student"},
         edit=_edit_map(**{"student_shape.intermediate_size": 32})),
    Case("distill_prune_map_edited_layers", "prune_distill", _distill("student.source={case}/student"), 5,
         r"prune_map\.json", "prune-map", copy={"student": "student"}, edit=_edit_map(kept_layers=[0, 1])),
    # ------------------------------------------------------------------ hub
    Case("distill_push_without_token", "prune_distill", _distill("push_to_hub=true", "hub.repo_id=you/model"), 9,
         r"no Hugging Face token found: set the HF_TOKEN", "hub", env=HUB_ENV),
    Case("distill_push_offline", "prune_distill", _distill("push_to_hub=true", "hub.repo_id=you/model"), 9,
         r"HF_HUB_OFFLINE is set", "hub", env={"HF_TOKEN": "hf_dummy", "HF_HUB_OFFLINE": "1"}),
    Case("push_folder_missing", "push", ["{case}/no_run", "--repo_id", "you/model"], 9, r"no_run is not a folder", "hub",
         env=HUB_ENV),
    Case("push_folder_without_config", "push", ["{case}/run", "--repo_id", "you/model"], 9, r"run has no config\.json", "hub",
         files={"run/model.safetensors": "x"}, env=HUB_ENV),
    Case("push_pickles_refused", "push", ["{case}/run", "--repo_id", "you/model"], 9, r"holds pickle files", "hub",
         files={"run/config.json": "{}", "run/pytorch_model.bin": "x", "run/model.safetensors": "x"}, env=HUB_ENV),
    Case("push_bad_repo_id", "push", ["{student}", "--repo_id", "not a repo"], 2, r"hub\.repo_id='not a repo'", "hub", env=HUB_ENV),
    Case("push_without_token", "push", ["{student}", "--repo_id", "you/model"], 9, r"no Hugging Face token found", "hub",
         env=HUB_ENV),
    Case("push_offline", "push", ["{student}", "--repo_id", "you/model"], 9, r"HF_HUB_OFFLINE is set", "hub",
         env={"HF_TOKEN": "hf_dummy", "HF_HUB_OFFLINE": "1"}),
    # ------------------------------------------------------------------ faults
    Case("distill_non_finite_loss", "prune_distill", _distill("train.lr=1e12", "train.max_steps=6"), 10,
         r"optimizer step \d+: loss component '[\w/]+' is (nan|inf|-inf); stopped without saving.*Lower train\.lr", "fault",
         may_write=("runs",)),
]


# ---------------------------------------------------------------------------------------------- helpers


def tree_digest(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under ``root`` except ``skip``."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _env(fx: Path, case_dir: Path, extra: dict[str, str | None]) -> dict[str, str | None]:
    env = {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": str(case_dir / ".hf_home"), "HF_DATASETS_CACHE": str(fx / "cache" / "datasets"),
        "MINIDISTILL_CACHE": str(fx / "cache" / "minidistill"), "OMP_NUM_THREADS": "1",
        "HF_TOKEN": None, "MINIDISTILL_DEBUG": None, "WORLD_SIZE": None, "RANK": None,
    }
    env.update(extra)
    return env


def _fill(arg: str, where: dict[str, Path]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(where[m.group(1)]), arg)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Tiny teacher, students (hand-pruned, other tokenizer, no prune map) and a gpt2 folder, built once."""
    from train_scripts.tiny_setup import make_student_dir, make_teacher_dir, tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bad_input")
    teacher = make_teacher_dir(root / "teacher")
    make_teacher_dir(root / "teacher_b", seed=1)  # same shape and tokenizer, other weights
    make_student_dir(teacher, root / "student")
    make_student_dir(teacher, root / "student_tok")
    tiny_tokenizer(shift=7).save_pretrained(root / "student_tok")
    make_student_dir(teacher, root / "student_nomap")
    (root / "student_nomap" / "prune_map.json").unlink()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(root / "gpt2")
    tiny_tokenizer().save_pretrained(root / "gpt2")
    return root


def _places(fx: Path, case_dir: Path) -> dict[str, Path]:
    names = ("teacher", "teacher_b", "student", "student_tok", "student_nomap", "gpt2")
    return {"case": case_dir, "fx": fx, **{n: fx / n for n in names}}


def _prepare(case: Case, case_dir: Path, fx: Path) -> None:
    case_dir.mkdir(parents=True)
    for rel, name in case.copy.items():
        shutil.copytree(fx / name, case_dir / rel)
    for rel, content in case.files.items():
        path = case_dir / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if case.edit is not None:
        case.edit(case_dir)


def check_result(case: Case, rc: int, out: str, err: str) -> None:
    text = out + err
    assert TRACEBACK not in text, f"{case.name}: traceback printed\n{err[-3000:]}"
    assert rc == case.code, f"{case.name}: exit {rc}, expected {case.code}\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.startswith("error [")]
    assert len(lines) == 1, f"{case.name}: expected one error line, got {lines}\n{err[-2000:]}"
    assert lines[0].startswith(f"error [{_kind(case.code)}, exit {case.code}]"), lines[0]
    assert re.search(case.match, lines[0]), f"{case.name}: {case.match!r} not in {lines[0]!r}"
    assert err.rstrip().splitlines()[-1] == lines[0], f"{case.name}: the error line is not the last line\n{err[-2000:]}"


def _kind(code: int) -> str:
    return next(kind for c, kind, _ in EXIT_CODES.values() if c == code)


def run_catalogue(cases: list[Case], fx: Path, root: Path, parallel: int = 2) -> dict[str, tuple[int, str, str]]:
    jobs = []
    for case in cases:
        case_dir = root / case.name
        _prepare(case, case_dir, fx)
        where = _places(fx, case_dir)
        jobs.append({
            "name": case.name, "script": str(SCRIPTS[case.script]), "argv": [_fill(a, where) for a in case.argv],
            "cwd": str(case_dir), "env": _env(fx, case_dir, case.env),
            "stdout": str(root / f"{case.name}.out"), "stderr": str(root / f"{case.name}.err"),
        })
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([PY, str(REPO / "tests" / "bad_input" / "runner.py"), str(root / "jobs.json"),
                           str(root / "results.json"), str(parallel)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads((root / "results.json").read_text())
    return {c.name: (codes[c.name], (root / f"{c.name}.out").read_text(), (root / f"{c.name}.err").read_text()) for c in cases}


# ---------------------------------------------------------------------------------------------- tests


def test_catalogue_shape():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 40
    assert {c.category for c in CASES} <= set(CATEGORIES)
    assert {c.code for c in CASES} == {code for code, _, _ in EXIT_CODES.values()}


def test_resume_does_not_swallow_an_override(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("prune_distill_recipe", SCRIPTS["prune_distill"])
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = recipe.parse_args(["--resume", "train.max_steps=5", "data.seq_len=64"])
    assert args.resume == "latest" and args.overrides == ["train.max_steps=5", "data.seq_len=64"]
    args = recipe.parse_args(["train.max_steps=5", "--resume", "auto", "data.seq_len=64"])
    assert args.resume == "auto" and args.overrides == ["train.max_steps=5", "data.seq_len=64"]
    (tmp_path / "step=3").mkdir()  # an existing checkpoint folder named like an override stays a path
    monkeypatch.chdir(tmp_path)
    assert recipe.parse_args(["--resume", "step=3"]).resume == "step=3"
    assert recipe.parse_args(["--resume"]).resume == "latest"


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0])
def test_non_finite_lr_refused_by_the_library_too(lr):
    from minidistill.config import ConfigError
    from minidistill.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.lr=.*: must be a positive finite number"):
        TrainConfig(lr=lr).validate()


def test_every_project_error_has_its_own_exit_code():
    """Each MinidistillError subclass in the package maps to a kind; kinds and codes are distinct."""
    import pkgutil

    import minidistill
    from minidistill.errors import MinidistillError, exit_code_for

    for info in pkgutil.walk_packages(minidistill.__path__, "minidistill."):
        importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = {cls.__name__: cls for cls in subclasses(MinidistillError)}
    assert {"ConfigError", "DataError", "TargetError", "PruneMapError", "CheckpointError", "ModelError", "HubError",
            "NonFiniteLossError", "UnsupportedArchitectureError", "OutputError"} <= set(found)
    for name, cls in found.items():
        err = cls.__new__(cls)
        assert exit_code_for(err) not in (None, 1) and err.exit_code == exit_code_for(err), name
    codes = [code for code, _, _ in EXIT_CODES.values()]
    kinds = [kind for _, kind, _ in EXIT_CODES.values()]
    assert len(set(codes)) == len(codes) and len(set(kinds)) == len(kinds) and 1 not in codes


DEBUG_CASE = Case("debug", "prune", _prune("--num_layers", "2", "--debug", model="{case}/none"), 1, "", "model")


@pytest.fixture(scope="module")
def catalogue_run(fx, tmp_path_factory):
    """Every case of the catalogue (and the --debug one) in one runner; the shared folders' digests before it."""
    root = tmp_path_factory.mktemp("catalogue")
    before = {n: tree_digest(fx / n) for n in ("teacher", "teacher_b", "student", "student_tok", "student_nomap", "gpt2")}
    return root, before, run_catalogue([*CASES, DEBUG_CASE], fx, root)


@pytest.mark.slow
def test_catalogue(fx, catalogue_run):
    """Every case: its exit code, one clear line naming the problem, no traceback, no input changed."""
    tmp_path, before, results = catalogue_run
    failures = []
    for case in CASES:
        rc, out, err = results[case.name]
        try:
            check_result(case, rc, out, err)
            case_dir = tmp_path / case.name
            skip = tuple(case_dir / p for p in (*case.may_write, ".hf_home"))
            after = tree_digest(case_dir, skip)
            fresh = case_dir.parent / f".{case.name}.expected"
            _prepare(case, fresh, fx)
            assert after == tree_digest(fresh), f"{case.name}: files in the case folder changed"
        except AssertionError as e:
            failures.append(str(e))
    assert {n: tree_digest(fx / n) for n in before} == before, "a shared model folder changed"
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_debug_shows_the_traceback(catalogue_run):
    """--debug re-raises the same error with its traceback (exit 1 as for any uncaught exception)."""
    rc, _out, err = catalogue_run[2][DEBUG_CASE.name]
    assert rc == 1 and TRACEBACK in err and "ModelError: no such folder" in err


# ---------------------------------------------------------------------------------------------- README


README_START, README_END = "<!-- what-is-checked:start -->", "<!-- what-is-checked:end -->"


def readme_section() -> str:
    """README.md's "What is checked" section, rendered from EXIT_CODES, CATEGORIES and CASES."""
    counts = {cat: sum(c.category == cat for c in CASES) for cat in CATEGORIES}
    counts["fault"] += 2  # test_sigkill_during_prune_then_rerun_completes (two kill points)
    lines = [
        README_START,
        "Every entry point (`recipes/prune.py`, `recipes/prune_distill.py`, `recipes/push.py`, `eval/run_lm_eval.py`,",
        "`recipes/export_gguf.py`) checks its input before loading a model where it can, and reports bad input as",
        "one line on stderr, `error [<kind>, exit <code>]: <what is wrong, the file or key, the fix>`, with no",
        "traceback (`--debug` or `MINIDISTILL_DEBUG=1` shows it) and nothing written or deleted. Under",
        "`accelerate launch` the launcher adds its own `CalledProcessError` traceback after that line;",
        "`accelerate launch -q` leaves the line last (and exits 1). `tests/test_bad_input.py` runs the catalogue",
        "below through the real commands, checking the exit code, the message, that no traceback is printed and",
        "that no input file changed.",
        "",
        "| exit | kind | raised for |",
        "| --- | --- | --- |",
        *[f"| {code} | `{kind}` | {what} |" for code, kind, what in sorted(EXIT_CODES.values())],
        "| 130 | interrupted | Ctrl-C |",
        "",
        f"The catalogue ({sum(counts.values())} cases):",
        "",
        *[f"- {CATEGORIES[cat]} ({counts[cat]})" for cat in CATEGORIES],
        README_END,
    ]
    return "\n".join(lines)


def test_readme_lists_every_exit_code_and_category():
    readme = (REPO / "README.md").read_text()
    assert README_START in readme and README_END in readme, "README.md lacks the What is checked section"
    current = readme[readme.index(README_START): readme.index(README_END) + len(README_END)]
    assert current == readme_section(), "README.md's What is checked section is stale; replace it with:\n" + readme_section()


# ---------------------------------------------------------------------------------------------- fresh processes


def _fresh_env(fx: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "MINIDISTILL_DEBUG", "RANK", "WORLD_SIZE")}
    env.update({k: v for k, v in _env(fx, home, {}).items() if v is not None})
    env["PYTHONPATH"] = str(REPO)
    return env


def test_no_script_shadows_an_installed_package():
    """``python eval/x.py`` puts eval/ first on sys.path: a script named like a package would hide it."""
    scripts = [p for d in ("eval", "recipes") for p in (REPO / d).glob("*.py")]
    assert scripts
    shadowing = [p.relative_to(REPO).as_posix() for p in scripts if importlib.util.find_spec(p.stem) is not None]
    assert not shadowing, f"rename {shadowing}: each hides the installed package of the same name"


@pytest.mark.slow
def test_readme_evaluation_command_runs(fx, tmp_path):
    """The README's lm-eval command, as written, on the tiny teacher and student (a real interpreter)."""
    readme = (REPO / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("python eval/")]
    argv = shlex.split(line)
    argv = [a.replace("=bundled", f"={fx / 'teacher'}").replace("runs/demo/model", str(fx / "student")) for a in argv]
    out = tmp_path / "eval"
    cmd = [PY, *argv[1:], "--limit", "2", "--batch_size", "2", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_fresh_env(fx, tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "lm_eval.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "distilled"} and "| distilled |" in proc.stdout
    assert rows["teacher"]["parameters"] > rows["distilled"]["parameters"]


@pytest.mark.slow
def test_error_under_accelerate_launch(fx, tmp_path):
    """Under ``accelerate launch`` the child prints its one error line; with ``-q`` it is the last line.

    Without ``-q`` accelerate re-raises the child's status as a CalledProcessError, whose traceback
    (the launcher's, not the recipe's) follows and ends naming the child's exit status.
    """
    launch = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"]
    recipe = [str(SCRIPTS["prune_distill"]), *[_fill(a, _places(fx, tmp_path)) for a in _distill("train.lr=nan")]]
    for quiet in (False, True):
        cmd = [*launch, *(["-q"] if quiet else []), *recipe]
        proc = subprocess.run(cmd, cwd=tmp_path, env=_fresh_env(fx, tmp_path), capture_output=True, text=True, timeout=600)
        lines = proc.stderr.splitlines()
        idx = [i for i, ln in enumerate(lines) if ln.startswith("error [config, exit 2]: train.lr='nan'")]
        assert proc.returncode != 0 and len(idx) == 1, proc.stderr[-3000:]
        after = lines[idx[0] + 1:]
        if quiet:
            assert after == [], proc.stderr[-3000:]
        else:
            assert "returned non-zero exit status 2" in after[-1] and "prune_distill.py\", line" not in proc.stderr


def _prune_run(fx: Path, root: Path, run_name: str) -> list[str]:
    args = [_fill(a, _places(fx, root)) for a in _distill(*PRUNE_STUDENT, "prune.calib_blocks=16", f"run_name={run_name}")]
    return [PY, str(SCRIPTS["prune_distill"]), *args]


@pytest.fixture(scope="module")
def uninterrupted(fx, tmp_path_factory) -> Path:
    """The prune-and-distill run that the interrupted ones must reproduce."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(_prune_run(fx, root, "full"), cwd=root, env=_fresh_env(fx, root), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "runs" / "full"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["minidistill.prune.apply: pruned student", "minidistill.prune.save: saved pruned student"])
def test_sigkill_during_prune_then_rerun_completes(fx, tmp_path, uninterrupted, kill_at):
    """SIGKILL inside the recipe's prune stage (before or right after the student is saved) leaves nothing a
    rerun trips on: the same command completes, pruning again, with the uninterrupted run's losses and weights."""
    cmd = _prune_run(fx, tmp_path, "tiny")
    env = _fresh_env(fx, tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if kill_at in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert not any("stage prune" in ln for ln in seen), "killed after the prune stage"
    assert not (run_dir / "model").exists() and not list(run_dir.glob("checkpoints/step-*"))
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage prune" in rerun.stderr  # pruned again rather than trusting what the killed run left
    assert json.loads((run_dir / "model" / "training_metadata.json").read_text())["steps"] == 2

    def losses(folder: Path) -> list[float]:
        records = [json.loads(ln) for ln in (folder / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r.get("kind") == "train"]

    assert len(losses(run_dir)) == 2 and losses(run_dir) == losses(uninterrupted)
    weights = [tree_digest(d / "model")["model.safetensors"] for d in (run_dir, uninterrupted)]
    assert weights[0] == weights[1]
    assert tree_digest(run_dir / "student_init")["model.safetensors"] == tree_digest(uninterrupted / "student_init")["model.safetensors"]

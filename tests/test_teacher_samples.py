"""Teacher samples: greedy-limit samples equal a cache-free reference decode, the folder is the same from one process or
several and after a kill, its inputs are checked, the data packs its token ids as they are, and the recipe reuses it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset
from train_scripts.tiny_setup import make_teacher_dir, tiny_overrides, tiny_tokenizer

from minidistill.config import ConfigError
from minidistill.data import DataConfig, DataError, build_text_data, load_documents, split_documents
from minidistill.distill.teacher_samples import (TeacherSamplesConfig, TeacherSamplesError, finish_samples_folder,
                                                 open_samples_folder, prompts_for, read_teacher_samples, sample_batch,
                                                 write_teacher_samples)
from minidistill.models import load_model
from minidistill.recipe_config import load_recipe_config
from minidistill.train import run_prune_distill


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher_dir(tmp_path_factory.mktemp("ts") / "teacher")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from minidistill.models import ModelConfig

    return load_model(ModelConfig(source=str(teacher_dir))).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _greedy_reference(model, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy decoding of one prompt by full forwards (no KV cache, no padding), stopped before a stop token."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stop:
            break
        ids.append(nxt)
    return ids


def test_top_k_1_samples_equal_a_cache_free_greedy_decode_of_each_prompt_alone(teacher, tok):
    # prompts of different lengths share a left-padded batch; the tiny teacher's EOS (2) and BOS (1) are stop ids
    prompts = [[5, 9, 30], [7], [11, 12, 13, 14, 15], [40, 41]]
    cfg = TeacherSamplesConfig(top_k=1, max_new_tokens=12)
    got = sample_batch(teacher, prompts, cfg, seed=3, stop_ids=[2], pad_id=2)
    for p, row in zip(prompts, got):
        assert row == _greedy_reference(teacher, p, 12, {2})
    # a token the model does produce, made a stop id, ends the sample before it
    first_new = got[0][len(prompts[0])]
    cut = sample_batch(teacher, prompts[:1], cfg, seed=3, stop_ids=[2, first_new], pad_id=2)
    assert cut == [prompts[0]]


def test_sampling_is_seeded_and_follows_the_temperature(teacher):
    prompts = [[5, 9, 30]] * 8
    cfg = TeacherSamplesConfig(max_new_tokens=10)
    a = sample_batch(teacher, prompts, cfg, seed=1, stop_ids=[2], pad_id=2)
    assert a == sample_batch(teacher, prompts, cfg, seed=1, stop_ids=[2], pad_id=2)
    assert a != sample_batch(teacher, prompts, cfg, seed=2, stop_ids=[2], pad_id=2)
    assert len({tuple(r) for r in a}) > 1  # rows of one batch draw their own tokens
    cold = sample_batch(teacher, prompts, TeacherSamplesConfig(max_new_tokens=10, temperature=1e-4), seed=1, stop_ids=[2], pad_id=2)
    assert len({tuple(r) for r in cold}) == 1  # near zero temperature every row takes the greedy path


def _write(cfg, teacher, tok, prompts, path, ranks=((0, 1),)):
    open_samples_folder(cfg, teacher, tok, prompts, path)
    for rank, world in ranks:
        write_teacher_samples(cfg, teacher, tok, prompts, path, rank=rank, world=world)
    finish_samples_folder(cfg, path)
    return read_teacher_samples(path)["input_ids"]


def test_two_processes_and_a_killed_run_write_the_samples_of_one_uninterrupted_process(teacher, tok, tmp_path):
    cfg = TeacherSamplesConfig(num_samples=10, samples_per_shard=3, batch_size=2, max_new_tokens=6)
    prompts = [[5, 9], [7, 8, 9], [30]]
    one = _write(cfg, teacher, tok, prompts, tmp_path / "one")
    assert len(one) == 10 and [r[: len(prompts[i % 3])] for i, r in enumerate(one)] == [prompts[i % 3] for i in range(10)]
    assert _write(cfg, teacher, tok, prompts, tmp_path / "two", ranks=((1, 2), (0, 2))) == one
    # killed after rank 0 of 2 wrote its shards, with a half-written shard left behind
    path = tmp_path / "killed"
    open_samples_folder(cfg, teacher, tok, prompts, path)
    write_teacher_samples(cfg, teacher, tok, prompts, path, rank=0, world=2)
    (path / "shard_00001.parquet.tmp").write_bytes(b"PAR1 cut")
    with pytest.raises(TeacherSamplesError, match=r"lack shard\(s\) \[1, 3\]: run again"):
        finish_samples_folder(cfg, path)
    with pytest.raises(TeacherSamplesError, match="incomplete"):
        read_teacher_samples(path)
    written = {p.name: p.stat().st_mtime_ns for p in path.glob("shard_*.parquet")}
    assert _write(cfg, teacher, tok, prompts, path) == one
    assert not list(path.glob("*.tmp"))
    assert all((path / name).stat().st_mtime_ns == t for name, t in written.items())  # complete shards were kept
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["new_tokens"] == sum(len(r) - len(prompts[i % 3]) for i, r in enumerate(one)) and manifest["tokens_per_second"] > 0


def test_samples_from_other_inputs_are_refused_naming_what_differs(teacher, tok, tmp_path, teacher_dir):
    cfg = TeacherSamplesConfig(num_samples=4, samples_per_shard=4, max_new_tokens=4)
    prompts = [[5, 9]]
    _write(cfg, teacher, tok, prompts, tmp_path / "s")
    with pytest.raises(TeacherSamplesError, match=r"another temperature .*samples 1\.0, now 0\.7.*teacher_samples\.path to a new folder"):
        open_samples_folder(TeacherSamplesConfig(num_samples=4, samples_per_shard=4, max_new_tokens=4, temperature=0.7),
                            teacher, tok, prompts, tmp_path / "s")
    with pytest.raises(TeacherSamplesError, match=r"another prompts \(token ids sha256\)"):
        open_samples_folder(cfg, teacher, tok, [[5, 10]], tmp_path / "s")
    from minidistill.models import ModelConfig

    other = load_model(ModelConfig(source=str(make_teacher_dir(tmp_path / "other", seed=1))))
    with pytest.raises(TeacherSamplesError, match=r"another teacher \(weights sha256\)"):
        open_samples_folder(cfg, other, tok, prompts, tmp_path / "s")
    with pytest.raises(TeacherSamplesError, match="gives no prompt"):
        open_samples_folder(cfg, teacher, tok, [], tmp_path / "none")


def test_corpus_prompts_are_prefixes_of_training_documents_only(tok):
    data = DataConfig(source="bundled", mix=["teacher_samples"], max_documents=40, seq_len=32)
    prompts = prompts_for(TeacherSamplesConfig(prompt_tokens=5), data, tok)
    splits = split_documents(load_documents(DataConfig(source="bundled", max_documents=40)), data)
    prefix = lambda text: tuple(tok(text, add_special_tokens=False)["input_ids"][:5])  # noqa: E731
    train, held = {prefix(t) for t in splits["train"]["text"]}, {prefix(t) for t in splits["heldout"]["text"]}
    assert len(prompts) == len(splits["train"]) and all(len(p) == 5 for p in prompts)
    assert {tuple(p) for p in prompts} <= train and not {tuple(p) for p in prompts} & (held - train)
    assert prompts_for(TeacherSamplesConfig(prompts="none"), data, tok) == [[tok.bos_token_id]]


def test_file_prompts_are_its_non_empty_lines(tok, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the government said\n\n  the minister  \n")
    data = DataConfig(source="bundled", mix=["teacher_samples"])
    assert prompts_for(TeacherSamplesConfig(prompts=str(path)), data, tok) == [
        tok("the government said", add_special_tokens=False)["input_ids"], tok("the minister", add_special_tokens=False)["input_ids"]]
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(TeacherSamplesError, match=r"prompts\.txt: not UTF-8 text \(byte 3\)"):
        prompts_for(TeacherSamplesConfig(prompts=str(path)), data, tok)


def test_the_data_packs_the_samples_token_ids_as_they_are(tok):
    docs = [[int(i) for i in torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n))] for n in range(5, 45)]
    cfg = DataConfig(source="teacher_samples", seq_len=16)
    generated = {"teacher_samples": Dataset.from_dict({"input_ids": docs})}
    data = build_text_data(cfg, tok, generated)
    splits = split_documents(generated["teacher_samples"], cfg)
    for name, blocks in (("train", data.train), ("heldout", data.heldout)):
        flat = [t for d in splits[name]["input_ids"] for t in d + [tok.eos_token_id]]
        n = len(flat) // 16
        assert blocks.input_ids.tolist() == [flat[i * 16:(i + 1) * 16] for i in range(n)]
    with pytest.raises(DataError, match="teacher_samples section"):
        build_text_data(cfg, tok)


def _recipe(root, teacher_dir, run_name, **extra):
    from train_scripts.tiny_setup import make_student_dir

    student = root / "student"
    if not student.is_dir():
        make_student_dir(teacher_dir, student)
    return load_recipe_config(None, tiny_overrides(root / "runs", teacher_dir, student, run_name=run_name, **{
        "data.mix": "[teacher_samples]", "teacher_samples.num_samples": 12, "teacher_samples.max_new_tokens": 20,
        "teacher_samples.batch_size": 4, "teacher_samples.samples_per_shard": 6, "teacher_samples.path": str(root / "samples"),
        "train.max_steps": 2, "train.save_every": 0, "eval.max_blocks": 2, **extra}))


def test_the_recipe_trains_on_the_samples_reports_them_and_reuses_them(teacher_dir, tmp_path, monkeypatch):
    cfg = _recipe(tmp_path, teacher_dir, "first", report="true", report_new_tokens=4)
    run_dir = run_prune_distill(cfg).run_dir
    samples = read_teacher_samples(tmp_path / "samples")["input_ids"]
    data = build_text_data(cfg.data, tiny_tokenizer(), {"teacher_samples": Dataset.from_dict({"input_ids": samples})})
    alone = build_text_data(cfg.data.replace(mix=[]), tiny_tokenizer())
    assert len(data.train) > len(alone.train) and "teacher_samples" in data.extra_heldout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["train_blocks"] == len(data.train)
    assert metrics["teacher_samples"]["num_samples"] == 12 and metrics["teacher_samples"]["new_tokens"] > 0
    assert metrics["models"]["distilled"]["heldout_sets"]["teacher_samples"]["perplexity"] > 1
    report = (run_dir / "report.md").read_text()
    assert "## Teacher samples" in report and "teacher_samples ppl" in report
    # a second run with the same settings reads the folder and never generates
    import transformers

    monkeypatch.setattr(transformers.GenerationMixin, "generate", lambda *a, **k: pytest.fail("samples generated again"))
    run_prune_distill(_recipe(tmp_path, teacher_dir, "second"))
    shutil.rmtree(tmp_path / "runs")


def test_recipe_config_checks(teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher_samples is set but the data does not read it; add teacher_samples to data\.mix"):
        load_recipe_config(None, ["teacher_samples.num_samples=8"])
    with pytest.raises(ConfigError, match=r"teacher_samples\.prompts=corpus takes its prompts from the data's other sources"):
        load_recipe_config(None, ["data.source=teacher_samples"])
    assert load_recipe_config(None, ["data.source=teacher_samples", "teacher_samples.prompts=none"]).samples.prompts == "none"
    assert load_recipe_config(None, ["data.mix=[teacher_samples]"]).samples == TeacherSamplesConfig()
    with pytest.raises(ConfigError, match=r"data\.streaming reads files, bundled corpora and Hub datasets, not 'teacher_samples'"):
        load_recipe_config(None, ["data.streaming=true", "data.source=/x.txt", "data.mix=[teacher_samples]", "data.mix_ratio=null"])
    with pytest.raises(ConfigError, match=r"teacher_samples\.prompts=.*nope\.txt.*does not exist"):
        load_recipe_config(None, ["data.mix=[teacher_samples]", f"teacher_samples.prompts={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match=r"teacher_samples\.num_samples=1: need at least 2"):
        load_recipe_config(None, ["data.mix=[teacher_samples]", "teacher_samples.num_samples=1"])

"""lm-eval runner, local tasks, rolling perplexity agreement with lm-eval, local evaluate metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minidistill.config import ConfigError
from minidistill.evaluation.lm_eval_runner import EvalRow, EvalTable, LmEvalConfig, run_lm_eval
from minidistill.evaluation.metrics import load_metric, top1_agreement
from minidistill.evaluation.perplexity import encode_like_hflm, rolling_perplexity, rolling_windows
from minidistill.evaluation.tasks import HELDOUT_PPL_TASK, LASTWORD_TASK, lastword_items, write_local_tasks

TEXTS = [
    "The council met on Tuesday to discuss the new budget for the city. Members argued for hours about "
    "the cost of repairing the old bridge over the river. In the end they agreed to delay the vote until next month.",
    "Rain fell across the north of the country overnight, and forecasters expect more storms this weekend. "
    "Farmers said the water was welcome after a long and dry summer.",
    "Short one.",
    "Police said a man was arrested after the robbery at the bank on Main Street. Nobody was hurt during the incident, "
    "according to a spokesman for the police department.",
]


@pytest.fixture(scope="module")
def bundled_tokenizer():
    from minidistill.models import load_tokenizer

    return load_tokenizer("bundled")


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A small byte-level BPE tokenizer that adds BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert fast.encode("hello")[0] == fast.bos_token_id
    return fast


def test_rolling_windows_match_lm_eval_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n, max_len in [(1, 4), (4, 4), (5, 4), (17, 4), (9, 3), (30, 7)]:
        tokens = list(range(100, 100 + n))
        ours = rolling_windows(tokens, 0, max_len)
        ref = []
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, 0, max_len, 1)):
            whole = (ctx + cont)[-(max_len + 1):]
            ref.append((whole[:-1], cont))
        assert ours == ref
        assert [t for _, tgt in ours for t in tgt] == tokens  # every token predicted once
        assert all(len(inp) <= max_len for inp, _ in ours)


def _naive_rolling_loglik(model, ids: list[int], prefix: int, max_len: int) -> float:
    """float64 reference: full forward per window, log-softmax over the whole vocabulary."""
    total = 0.0
    for inp, tgt in rolling_windows(ids, prefix, max_len):
        logits = model(input_ids=torch.tensor([inp])).logits[0].double()
        logp = F.log_softmax(logits, -1)[len(inp) - len(tgt):]
        total += logp[torch.arange(len(tgt)), torch.tensor(tgt)].sum().item()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_kind", ["bundled", "bos"])
def test_fast_word_perplexity_agrees_with_lm_eval(tokenizer_kind, request, tmp_path):
    tok = request.getfixturevalue(f"{tokenizer_kind}_tokenizer")
    vocab = 49152 if tokenizer_kind == "bundled" else len(tok)
    model = tiny_model("llama", vocab_size=vocab)
    max_len = 24  # several windows per document
    ours = rolling_perplexity(model, tok, TEXTS, max_length=max_len, batch_size=3)
    # The fast path equals a naive full-forward reference, document by document.
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ref_ll = sum(_naive_rolling_loglik(model, encode_like_hflm(tok, t), prefix, max_len) for t in TEXTS)
    assert ours["loglikelihood"] == pytest.approx(ref_ll, rel=1e-5)
    task_dir = write_local_tasks(tmp_path / "tasks", TEXTS)
    cfg = LmEvalConfig(tasks=[HELDOUT_PPL_TASK], batch_size=4, max_length=max_len)
    table = run_lm_eval({"tiny": (model, tok)}, cfg, task_dir=task_dir)
    theirs = table.row("tiny").metrics[HELDOUT_PPL_TASK]
    assert theirs["word_perplexity"] == pytest.approx(ours["word_perplexity"], rel=1e-4)
    assert theirs["byte_perplexity"] == pytest.approx(ours["byte_perplexity"], rel=1e-4)
    assert theirs["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-4)


def test_lastword_items_are_deterministic_sentences():
    items = lastword_items(TEXTS, max_items=10, per_document=2)
    assert items == lastword_items(TEXTS, max_items=10, per_document=2)
    assert items[0] == {"context": "The council met on Tuesday to discuss the new budget for the", "target": " city"}
    assert items[1]["target"] == " river"
    assert items[1]["context"].endswith("the cost of repairing the old bridge over the")
    assert items[1]["context"].startswith("The council met")  # preceding sentences are context
    assert items[2]["target"] == " weekend"
    assert all(it["target"].startswith(" ") and " " not in it["target"][1:] for it in items)
    assert len(lastword_items(TEXTS, max_items=3)) == 3


def _lastword_reference(model, tok, items):
    """Greedy-match accuracy and perplexity of the last-word items, computed directly."""
    correct, lls = 0, []
    for it in items:
        ctx = tok.encode(it["context"])
        whole = tok.encode(it["context"] + it["target"])
        cont = whole[len(ctx):]
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(cont):].double()
        logp = F.log_softmax(logits, -1)
        lls.append(logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item())
        correct += int(logits.argmax(-1).tolist() == cont)
    return correct / len(items), math.exp(-sum(lls) / len(lls))


@pytest.mark.slow
def test_run_lm_eval_side_by_side_table(bundled_tokenizer, tmp_path):
    tok = bundled_tokenizer
    teacher = tiny_model("llama", vocab_size=49152, seed=0)
    student = tiny_model("llama", vocab_size=49152, seed=1, num_layers=1)
    task_dir = write_local_tasks(tmp_path / "tasks", TEXTS, max_lastword_items=5)
    cfg = LmEvalConfig(limit=3, batch_size=4, output_dir=str(tmp_path / "out"))
    table = run_lm_eval({"teacher": (teacher, tok), "student": (student, tok)}, cfg, task_dir=task_dir)
    assert [r.name for r in table.rows] == ["teacher", "student"]
    from minidistill.adapters import count_parameters

    assert table.row("student").parameters == count_parameters(student) < table.row("teacher").parameters
    items = [json.loads(line) for line in (task_dir / "lastword.jsonl").read_text().splitlines()][:3]
    for name, model in (("teacher", teacher), ("student", student)):
        acc, ppl = _lastword_reference(model, tok, items)
        m = table.row(name).metrics[LASTWORD_TASK]
        assert m["acc"] == pytest.approx(acc)
        assert m["perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert table.row(name).samples[LASTWORD_TASK] == 3
        assert table.row(name).wall_time_s > 0
    saved = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert EvalTable.from_json(saved).to_json() == table.to_json()
    md = (tmp_path / "out" / "lm_eval.md").read_text()
    assert "| teacher |" in md and "| student |" in md and "minidistill_lastword acc" in md


def test_eval_table_markdown():
    table = EvalTable(
        rows=[EvalRow("teacher", 2_000_000, 1_500_000, 1.25, {"t": {"acc": 0.5, "ppl": 12.345678}}),
              EvalRow("student", 1_000_000, 500_000, 0.5, {"t": {"acc": 0.25}})],
        tasks=["t"],
    )
    lines = table.to_markdown().splitlines()
    assert lines[0] == "| model | params | non-emb params | wall s | t acc | t ppl |"
    assert lines[2] == "| teacher | 2.0M | 1.5M | 1.2 | 0.5 | 12.35 |"
    assert lines[3] == "| student | 1.0M | 500.0K | 0.5 | 0.25 | - |"


def test_config_validation_names_key():
    with pytest.raises(ConfigError, match="lm_eval.limit"):
        LmEvalConfig(limit=0).validate()
    with pytest.raises(ConfigError, match="lm_eval.tasks"):
        LmEvalConfig(tasks=[]).validate()
    with pytest.raises(ConfigError, match="unknown config key 'taks'"):
        LmEvalConfig.from_dict({"taks": ["x"]})
    assert LmEvalConfig.from_dict({"limit": 0.5}).limit == 0.5


def test_local_metrics_load_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    agreement = load_metric("agreement").compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 0])
    assert agreement == {"agreement": 0.5}
    acc = load_metric("accuracy").compute(predictions=[1, 0, 1], references=[1, 1, 1])
    assert acc["accuracy"] == pytest.approx(2 / 3)
    ppl = load_metric("perplexity").compute(predictions=[-3.0, -5.0], references=[2, 2])
    assert ppl["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="unknown local metric"):
        load_metric("bleu")


def test_top1_agreement_matches_full_logits():
    teacher = tiny_model("llama", seed=0)
    student = tiny_model("llama", seed=3)
    batches = [torch.randint(0, 128, (2, 12)), torch.randint(0, 128, (1, 12))]
    ref_s = torch.cat([student(input_ids=b).logits.argmax(-1).flatten() for b in batches])
    ref_t = torch.cat([teacher(input_ids=b).logits.argmax(-1).flatten() for b in batches])
    expected = (ref_s == ref_t).double().mean().item()
    assert top1_agreement(student, teacher, batches, chunk_tokens=5) == pytest.approx(expected)
    assert top1_agreement(teacher, teacher, batches) == 1.0


@pytest.mark.slow
def test_bundled_teacher_on_local_tasks(tmp_path):
    """The real teacher: lm-eval and the fast evaluator agree, and its scores are those of a trained model."""
    from minidistill.data import DataConfig
    from minidistill.evaluation.tasks import heldout_texts
    from minidistill.models import ModelConfig, load_model_and_tokenizer

    teacher, tok = load_model_and_tokenizer(ModelConfig())
    docs, _ = heldout_texts(DataConfig())
    docs = [docs[0][:1000]]  # one document, a few hundred tokens: keeps the test short on CPU
    task_dir = write_local_tasks(tmp_path / "tasks", docs, max_lastword_items=3)
    table = run_lm_eval({"teacher": (teacher, tok)}, LmEvalConfig(batch_size=4, max_length=128), task_dir=task_dir)
    ours = rolling_perplexity(teacher, tok, docs, max_length=128)
    assert table.row("teacher").metrics[HELDOUT_PPL_TASK]["word_perplexity"] == pytest.approx(ours["word_perplexity"], rel=1e-4)
    assert ours["word_perplexity"] < 200  # a trained model on news text (a random one is near 1e6)
    assert table.row("teacher").metrics[LASTWORD_TASK]["perplexity"] < 1000  # a random one is near 5e4


def test_unknown_task_fails_before_scoring():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="unknown task 'minidistill_heldout_pl'.*did you mean minidistill_heldout_ppl"):
        run_lm_eval({"m": (model, None)}, LmEvalConfig(tasks=["minidistill_heldout_pl"]))


@pytest.mark.slow
def test_other_task_names_pass_through(bundled_tokenizer, tmp_path):
    """A name that is not a local task reaches lm-eval's TaskManager as it is (here a user task YAML)."""
    import yaml

    user = tmp_path / "user_tasks"
    user.mkdir()
    (user / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = {
        "task": "my_rolling_task", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(user / "docs.jsonl")}}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False}],
    }
    (user / "my_rolling_task.yaml").write_text(yaml.safe_dump(spec))
    model = tiny_model("llama", vocab_size=49152)
    cfg = LmEvalConfig(tasks=["my_rolling_task"], include_path=str(user), max_length=32, limit=2)
    table = run_lm_eval({"m": (model, bundled_tokenizer)}, cfg)
    ours = rolling_perplexity(model, bundled_tokenizer, TEXTS[:2], max_length=32)
    assert table.row("m").metrics["my_rolling_task"]["word_perplexity"] == pytest.approx(ours["word_perplexity"], rel=1e-4)


def test_prepare_local_tasks_from_data_config(tmp_path):
    import yaml

    from minidistill.data import DataConfig, load_documents, split_documents
    from minidistill.evaluation.tasks import prepare_local_tasks

    cfg = DataConfig(max_documents=40)
    folder = prepare_local_tasks(cfg, tmp_path / "t", max_lastword_items=7)
    heldout = list(split_documents(load_documents(cfg), cfg)["heldout"]["text"])
    rows = [json.loads(line)["text"] for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert rows == heldout
    items = [json.loads(line) for line in (folder / "lastword.jsonl").read_text().splitlines()]
    assert items == lastword_items(heldout, max_items=7)
    for name in (HELDOUT_PPL_TASK, LASTWORD_TASK):
        spec = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert spec["task"] == name
        assert spec.get("num_fewshot") == (0 if name == HELDOUT_PPL_TASK else None)
        for path in spec["dataset_kwargs"]["data_files"].values():
            assert path.startswith("/") and (folder / path.rsplit("/", 1)[1]).is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed into place


def test_rolling_loglikelihood_matches_naive_on_every_architecture(model_type, bos_tokenizer):
    from minidistill.evaluation.perplexity import document_loglikelihoods

    tok = bos_tokenizer
    model = tiny_model(model_type, vocab_size=len(tok))
    texts = [TEXTS[1][:120], TEXTS[2]]  # a few windows each, to keep the float64 reference cheap
    per_doc = document_loglikelihoods(model, tok, texts, max_length=32, batch_size=3, chunk_tokens=7)
    for text, (ll, n) in zip(texts, per_doc):
        ids = encode_like_hflm(tok, text)
        assert n == len(ids)
        assert ll == pytest.approx(_naive_rolling_loglik(model, ids, tok.bos_token_id, 32), rel=1e-5, abs=1e-4)


def test_perplexity_metric_agrees_with_rolling_perplexity(bos_tokenizer):
    from minidistill.evaluation.perplexity import count_words, document_loglikelihoods

    model = tiny_model("llama", vocab_size=len(bos_tokenizer))
    per_doc = document_loglikelihoods(model, bos_tokenizer, TEXTS, max_length=32)
    via_metric = load_metric("perplexity").compute(
        predictions=[ll for ll, _ in per_doc], references=[count_words(t) for t in TEXTS]
    )["perplexity"]
    assert via_metric == pytest.approx(rolling_perplexity(model, bos_tokenizer, TEXTS, max_length=32)["word_perplexity"], rel=1e-9)


@pytest.mark.slow
def test_evaluate_cli_on_saved_folder(bundled_tokenizer, tmp_path, capsys):
    """eval/run_lm_eval.py scores a saved model folder on the local tasks built from the bundled corpus."""
    import importlib.util
    from pathlib import Path

    folder = tmp_path / "student"
    model = tiny_model("llama", vocab_size=49152)
    model.save_pretrained(folder)
    bundled_tokenizer.save_pretrained(folder)
    spec = importlib.util.spec_from_file_location("run_lm_eval", Path(__file__).parents[1] / "eval" / "run_lm_eval.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "eval"
    from minidistill.evaluation.lm_eval_runner import main

    assert main(["--model", f"student={folder}", "--limit", "2", "--batch_size", "2", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| student |" in printed
    saved = json.loads((out / "lm_eval.json").read_text())
    row = saved["rows"][0]
    assert row["name"] == "student" and row["samples"] == {HELDOUT_PPL_TASK: 2, LASTWORD_TASK: 2}
    docs = [json.loads(line)["text"] for line in (out / "lm_eval_tasks" / "heldout.jsonl").read_text().splitlines()][:2]
    ours = rolling_perplexity(model, bundled_tokenizer, docs)
    assert row["metrics"][HELDOUT_PPL_TASK]["word_perplexity"] == pytest.approx(ours["word_perplexity"], rel=1e-4)
    assert recipe.main is main


@pytest.mark.slow
def test_lastword_few_shot_prompt(bundled_tokenizer, tmp_path):
    """num_fewshot=1 prefixes each item with the (single) few-shot example and a blank line."""
    example_doc = "The old ship sailed slowly into the harbour at dawn."
    task_dir = write_local_tasks(tmp_path / "tasks", TEXTS, fewshot_texts=[example_doc], max_lastword_items=3)
    (example,) = lastword_items([example_doc])
    model = tiny_model("llama", vocab_size=49152)
    cfg = LmEvalConfig(tasks=[LASTWORD_TASK], num_fewshot=1, limit=3, batch_size=3)
    table = run_lm_eval({"m": (model, bundled_tokenizer)}, cfg, task_dir=task_dir)
    items = [json.loads(line) for line in (task_dir / "lastword.jsonl").read_text().splitlines()][:3]
    shot = example["context"] + example["target"] + "\n\n"
    prompted = [{"context": shot + it["context"], "target": it["target"]} for it in items]
    acc, ppl = _lastword_reference(model, bundled_tokenizer, prompted)
    assert table.row("m").metrics[LASTWORD_TASK]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert table.row("m").metrics[LASTWORD_TASK]["acc"] == pytest.approx(acc)
    _, zero_shot_ppl = _lastword_reference(model, bundled_tokenizer, items)
    assert zero_shot_ppl != pytest.approx(ppl, rel=1e-4)  # the prompt really changed

from __future__ import annotations

import json

import pytest
import torch

from minidistill.config import ConfigError
from minidistill.data import DataConfig, DataError, build_text_data, load_documents, split_documents
from minidistill.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled")


def _docs(n=40):
    return [f"Document number {i} talks about topic {i % 7} and more words follow here." * 3 for i in range(n)]


def test_local_formats_agree_and_pack_like_a_reference(tmp_path, tok):
    docs = _docs()
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n\n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    results = {}
    for name, column in (("d.txt", "text"), ("d.jsonl", "body"), ("d.parquet", "text")):
        cfg = DataConfig(source=str(tmp_path / name), text_column=column, seq_len=32, heldout_fraction=0.25)
        results[name] = build_text_data(cfg, tok)
    a = results["d.txt"]
    for other in results.values():
        assert torch.equal(other.train.input_ids, a.train.input_ids)
        assert torch.equal(other.heldout.input_ids, a.heldout.input_ids)
    # Reference packing: the held-out documents in split order, each followed by EOS, cut into 32-token blocks.
    cfg = DataConfig(source=str(tmp_path / "d.txt"), seq_len=32, heldout_fraction=0.25)
    held = split_documents(load_documents(cfg), cfg)["heldout"]["text"]
    assert len(held) == 10
    flat = [t for d in held for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    n = len(flat) // 32
    assert torch.equal(a.heldout.input_ids, torch.tensor(flat[: n * 32]).view(n, 32))


def test_split_is_deterministic_and_disjoint(tmp_path):
    (tmp_path / "d.txt").write_text("\n".join(_docs(50)))
    cfg = DataConfig(source=str(tmp_path / "d.txt"), heldout_fraction=0.2, seed=3)
    s1 = split_documents(load_documents(cfg), cfg)
    s2 = split_documents(load_documents(cfg), cfg)
    assert s1["heldout"]["text"] == s2["heldout"]["text"] and len(s1["heldout"]) == 10
    assert not set(s1["heldout"]["text"]) & set(s1["train"]["text"])
    s3 = split_documents(load_documents(cfg), cfg.replace(seed=4))
    assert s3["heldout"]["text"] != s1["heldout"]["text"]


def test_bundled_corpus(tok):
    data = build_text_data(DataConfig(seq_len=256), tok)
    assert len(data.train) > 200 and len(data.heldout) > 20
    assert data.train.input_ids.shape[1] == 256 and data.train.input_ids.max() < len(tok)


def test_bad_input_errors(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in _docs(5)))
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\].*text_column"):
        load_documents(DataConfig(source=str(tmp_path / "d.jsonl")))
    (tmp_path / "short.txt").write_text("a few words\nand a few more\n")
    with pytest.raises(DataError, match="less than one sequence"):
        build_text_data(DataConfig(source=str(tmp_path / "short.txt"), seq_len=64), tok)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="need at least 2"):
        load_documents(DataConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_documents(DataConfig(source=str(tmp_path / "x.csv")))
    with pytest.raises(ConfigError, match="heldout_fraction"):
        DataConfig.from_dict({"heldout_fraction": 1.5})

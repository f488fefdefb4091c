"""Bundled corpora (news, Wikipedia sample) and mixing sources into the training blocks."""

from __future__ import annotations

import pytest
import torch

from minidistill.config import ConfigError
from minidistill.corpora import wiki_documents, wiki_to_text
from minidistill.data import DataConfig, DataError, build_text_data, check_data_source, load_documents, split_documents
from minidistill.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled")


MARKUP = """{{Infobox person|name=Ada|birth={{birth date|1815|12|10}}}}
'''Augusta Ada King''' was an English [[mathematician]] and [[Writer|writer]].<ref name="a">Some source.</ref>
She worked on [[Charles Babbage]]'s proposed [[Analytical Engine|mechanical general-purpose computer]].[[File:Ada.jpg|thumb|A [[portrait]]]]

== Early life ==
Ada was born in London on 10&amp;nbsp;December 1815, the only child of the poet [[Lord Byron]].<!-- hidden -->
{| class="wikitable"
| a table || cell
|}
* a list item that is not prose at all here
== References ==
Some reference text that must not be kept in the output at all.
[[Category:Mathematicians]]
"""


def test_wiki_markup_becomes_plain_paragraphs():
    assert wiki_to_text(MARKUP) == (
        "Augusta Ada King was an English mathematician and writer. She worked on Charles Babbage's proposed "
        "mechanical general-purpose computer.\n\n"
        "Ada was born in London on 10 December 1815, the only child of the poet Lord Byron."
    )


def test_bundled_wiki_is_general_prose_without_markup():
    docs = wiki_documents()
    assert 80 <= len(docs) <= 120
    words = sum(len(d.split()) for d in docs)
    assert words > 300_000
    text = "\n".join(docs)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&nbsp;", "'''"):
        assert markup not in text, markup
    assert docs[0].startswith("Anarchism is a political philosophy")


def test_bundled_sources_load_and_unknown_ones_are_named():
    news = load_documents(DataConfig(source="bundled"))
    assert load_documents(DataConfig(source="bundled:news"))["text"] == news["text"]
    assert len(news) == 300
    with pytest.raises(DataError, match=r"bundled:poems.*bundled:news, bundled:wiki"):
        load_documents(DataConfig(source="bundled:poems"))
    check_data_source(DataConfig(source="bundled", mix=["bundled:wiki"]))
    with pytest.raises(DataError, match="bundled:poems"):
        check_data_source(DataConfig(source="bundled", mix=["bundled:poems"]))


def _write(path, prefix: str, n: int):
    path.write_text("\n".join(f"{prefix} document {i} " + " ".join(f"{prefix}{i}w{j}" for j in range(60)) for i in range(n)))
    return str(path)


def test_mix_adds_train_blocks_only_and_keeps_each_heldout_apart(tmp_path, tok):
    a, b = _write(tmp_path / "a.txt", "alpha", 40), _write(tmp_path / "b.txt", "beta", 60)
    alone_a = build_text_data(DataConfig(source=a, seq_len=32), tok)
    alone_b = build_text_data(DataConfig(source=b, seq_len=32), tok)
    mixed = build_text_data(DataConfig(source=a, mix=[b], seq_len=32), tok)
    # Reference: each source split and packed on its own; training is their blocks shuffled together.
    both = torch.cat([alone_a.train.input_ids, alone_b.train.input_ids])
    assert sorted(map(tuple, mixed.train.input_ids.tolist())) == sorted(map(tuple, both.tolist()))
    assert not torch.equal(mixed.train.input_ids, both)
    first = {tuple(r) for r in mixed.train.input_ids[:8].tolist()}
    assert first & {tuple(r) for r in alone_a.train.input_ids.tolist()} and first & {tuple(r) for r in alone_b.train.input_ids.tolist()}
    assert torch.equal(mixed.heldout.input_ids, alone_a.heldout.input_ids)
    assert torch.equal(mixed.extra_heldout[b].input_ids, alone_b.heldout.input_ids)
    # The mixed source's held-out documents are never trained on.
    held_docs = split_documents(load_documents(DataConfig(source=b)), DataConfig(source=b))["heldout"]["text"]
    train_text = tok.decode(mixed.train.input_ids.flatten())
    for doc in held_docs:
        assert doc.split(" ", 3)[3][:40] not in train_text


def test_mix_ratio_takes_a_seeded_subset(tmp_path, tok):
    a, b = _write(tmp_path / "a.txt", "alpha", 40), _write(tmp_path / "b.txt", "beta", 200)
    alone_a = build_text_data(DataConfig(source=a, seq_len=32), tok)
    alone_b = build_text_data(DataConfig(source=b, seq_len=32), tok)
    half = build_text_data(DataConfig(source=a, mix=[b], mix_ratio=0.5, seq_len=32), tok)
    n_a = len(alone_a.train)
    rows_a = {tuple(r) for r in alone_a.train.input_ids.tolist()}
    rows_b = {tuple(r) for r in alone_b.train.input_ids.tolist()}
    rows = [tuple(r) for r in half.train.input_ids.tolist()]
    extra = [r for r in rows if r not in rows_a]
    assert len(rows) - len(extra) == n_a and len(extra) == round(0.5 * n_a)
    assert all(r in rows_b for r in extra)
    again = build_text_data(DataConfig(source=a, mix=[b], mix_ratio=0.5, seq_len=32), tok)
    assert torch.equal(again.train.input_ids, half.train.input_ids)


def test_bad_mix_settings_are_refused():
    with pytest.raises(ConfigError, match="data.mix_ratio"):
        DataConfig(mix=["bundled:wiki"], mix_ratio=0).validate()
    with pytest.raises(ConfigError, match="repeats a source"):
        DataConfig(source="bundled", mix=["bundled"]).validate()

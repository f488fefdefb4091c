"""Corpora that ship inside PyPI wheels, so that the demo and the tests run offline.

Both come from the ``gensim`` wheel's test data (``pip install --no-deps gensim``):

- ``news``: the Lee background corpus (``lee_background.cor``), 300 Australian news articles, one per
  line, ~80k tokens.
- ``wiki``: a sample of English Wikipedia (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  a 2016 dump of the first pages: Anarchism, Autism, Albedo, Abraham Lincoln, ...), 107 articles after
  redirects are dropped, converted from wiki markup to plain paragraphs (~1M tokens of general prose).
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
from pathlib import Path

NEWS_FILE = "lee_background.cor"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BUNDLED_CORPORA = ("news", "wiki")


def gensim_test_data(name: str) -> Path:
    """A file of the gensim wheel's ``test/test_data`` folder (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled corpora need the gensim wheel: run `pip install --no-deps gensim`")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall gensim`")
    return path


def news_documents() -> list[str]:
    """The Lee background corpus, one news article per document."""
    lines = gensim_test_data(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", re.S)
_DROP_SECTIONS = re.compile(
    r"^(see also|references|notes|footnotes|further reading|external links|bibliography|sources|citations)$", re.I
)


def _strip_nested(text: str, opening: str, closing: str) -> str:
    """``text`` without every (possibly nested) ``opening ... closing`` span."""
    out, depth, i = [], 0, 0
    n_open, n_close = len(opening), len(closing)
    while i < len(text):
        if text.startswith(opening, i):
            depth += 1
            i += n_open
        elif depth and text.startswith(closing, i):
            depth -= 1
            i += n_close
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_MEDIA_LINK = re.compile(r"\[\[\s*(?:file|image|category|media)\s*:", re.I)


def _strip_media_links(text: str) -> str:
    """``text`` without ``[[File:...]]`` / ``[[Image:...]]`` / ``[[Category:...]]`` links, captions (nested links) included."""
    out, i = [], 0
    while (m := _MEDIA_LINK.search(text, i)) is not None:
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
            else:
                j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if ":" in target and target.split(":", 1)[0].strip().lower() in ("file", "image", "category", "media"):
        return ""
    if ":" in target and not label:  # interlanguage and namespace links
        return ""
    return (label or target).split("|")[-1]


def wiki_to_text(markup: str) -> str:
    """Plain paragraphs from MediaWiki markup: no templates, tables, references, files, categories or lists.

    Headings end a paragraph; sections after "See also" / "References" / "External links" are dropped.
    """
    t = html.unescape(markup)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|pre|code)[^>]*>.*?</\1>", "", t, flags=re.S)
    t = _strip_media_links(t)
    for _ in range(2):  # links inside link labels
        t = re.sub(r"\[\[([^\[\]]*)\]\]", _link_text, t)
    t = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = html.unescape(t).replace("\xa0", " ")  # entities written escaped inside the XML (&amp;nbsp;)
    t = re.sub(r"'{2,}", "", t)
    paragraphs: list[str] = []
    current: list[str] = []
    dropping = False
    for line in t.splitlines():
        s = line.strip()
        heading = re.fullmatch(r"(={2,})\s*(.*?)\s*\1", s)
        if heading or not s:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            if heading:
                dropping = bool(_DROP_SECTIONS.match(heading.group(2)))
            continue
        if dropping or s[0] in "*#:;|!{}_" or s.startswith("__"):
            continue
        current.append(s)
    if current:
        paragraphs.append(" ".join(current))
    prose = [re.sub(r"\s+", " ", p).strip() for p in paragraphs]
    prose = [re.sub(r"\(\s*[,;]?\s*\)", "", p).replace(" ,", ",").replace(" .", ".") for p in prose]
    return "\n\n".join(p for p in prose if len(p.split()) >= 8)


def wiki_documents() -> list[str]:
    """The Wikipedia sample, one article per document (redirects and near-empty pages dropped)."""
    raw = bz2.decompress(gensim_test_data(WIKI_FILE).read_bytes()).decode("utf-8")
    docs = []
    for _title, markup in _PAGE.findall(raw):
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = wiki_to_text(markup)
        if len(text.split()) >= 50:
            docs.append(text)
    return docs


def bundled_documents(name: str) -> list[str]:
    """The documents of the bundled corpus ``name`` (one of :data:`BUNDLED_CORPORA`)."""
    if name == "news":
        return news_documents()
    if name == "wiki":
        return wiki_documents()
    raise ValueError(f"no bundled corpus {name!r}; choose one of {list(BUNDLED_CORPORA)}")


__all__ = ["BUNDLED_CORPORA", "bundled_documents", "gensim_test_data", "news_documents", "wiki_documents", "wiki_to_text"]

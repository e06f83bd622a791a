"""Extractive summaries and keywords of plain English text: pure Python, no model, no network.

The pieces, each usable on its own:

* :func:`split_sentences` splits text into sentences without being fooled by abbreviations
  (``e.g.``, ``Dr.``, ``U.S.``), initials (``J. R. Tolkien``), numbers (``3.14``,
  ``Fig. 2``) or closing quotes;
* :func:`keywords` ranks the content words of a text (stopwords and numbers excluded,
  plurals folded into one term) by normalized frequency;
* :func:`summarize` picks the highest-scoring sentences (normalized term frequency of their
  content words, with a bonus for coming early and for leading a paragraph, near-duplicates
  skipped) and returns them in their original order, with keywords and reading statistics;
* :func:`chunk` cuts text into parts of about equal length along sentence boundaries.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STOPWORDS",
    "WORDS_PER_MINUTE",
    "Sentence",
    "chunk",
    "keywords",
    "reading_seconds",
    "segment",
    "split_sentences",
    "summarize",
    "word_count",
]


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


#: Average silent reading speed of adults for non-fiction (Brysbaert 2019).
WORDS_PER_MINUTE = 238

#: Common English function words; never keywords, never counted when scoring sentences.
STOPWORDS: frozenset[str] = _wordset(
    """
    a about above across after again against all almost along already also although always
    am among an and another any anybody anyone anything anyway anywhere are aren't around as
    at be became because become becomes been before being below between both but by can
    can't cannot could couldn't did didn't do does doesn't doing don't done down during each
    either else enough etc even ever every everyone everything few for from further get gets
    getting got had hadn't has hasn't have haven't having he he'd he'll he's her here here's
    hers herself him himself his how how's however i i'd i'll i'm i've if in into is isn't it
    it'd it'll it's its itself just least less let let's like likely made make makes many
    may maybe me might more most much must mustn't my myself neither never no nobody none nor
    not nothing now of off often on once one ones only onto or other others otherwise ought
    our ours ourselves out over own per perhaps quite rather really said same say says
    shall shan't she she'd she'll she's should shouldn't since so some somebody someone
    something sometimes somewhat still such than that that's the their theirs them
    themselves then there there'd there'll there're there's therefore these they they'd
    they'll they're they've thing things this those though through throughout thus till to
    together too toward towards under unless until up upon us use used uses using usually
    very via was wasn't way we we'd we'll we're we've well were weren't what what's whatever
    when when's whenever where where's whereas wherever whether which while who who's whoever
    whole whom whose why why's will with within without won't would wouldn't yes yet you
    you'd you'll you're you've your yours yourself yourselves
    mr mrs ms dr prof st
    """
)

# Abbreviations that never end a sentence: titles before a name, Latin shorthand.
_NEVER_FINAL = _wordset(
    """
    mr mrs ms mx dr prof rev hon gen col capt cpt lt sgt cmdr adm gov sen rep pres supt fr
    e.g i.e cf viz vs approx ca ibid resp univ assn
    """
)
# Abbreviations that stand before a number: "Fig. 2", "No. 7", "pp. 10-12", "Jan. 5".
_BEFORE_NUMBER = _wordset(
    """
    no nos nr p pp vol vols fig figs eq eqs ch chap sec sect art tab ref refs ed eds op
    jan feb mar apr jun jul aug sep sept oct nov dec
    """
)
# Abbreviations that may end a sentence: "... and Sons Ltd. The firm ..." splits,
# "... Acme Inc. reported ..." does not.
_MAYBE_FINAL = _wordset("etc inc ltd co corp llc plc bros jr sr esq al dept st mt ft")

_APOSTROPHE = "\u2019"  # right single quotation mark, the typographic apostrophe
_CLOSERS = "\"'\u201d\u2019\u00bb)]}"
_OPENERS = "\"'\u201c\u2018\u00ab([{"
# A run of terminal punctuation, any closing quotes or brackets, then space or the end.
_TERMINATOR = re.compile(rf"[.!?…]+[{re.escape(_CLOSERS)}]*(?=\s|$)")
_NEXT_TOKEN = re.compile(rf"\s*[{re.escape(_OPENERS)}]*(\S*)")
_WORD_START = re.compile(r"[^\W_]*")
# Blocks: blank lines, and line breaks before a list item or a Markdown heading.
_BLOCK_BREAK = re.compile(r"\n[ \t]*(?:\n\s*|(?=(?:[-*+•‣◦]|\d{1,3}[.)]|#{1,6})[ \t]))")
_WORD = re.compile(rf"[^\W_]+(?:['{_APOSTROPHE}][^\W_]+)*")

_MIN_WORDS = 5  # sentences shorter than this are penalized (headings, fragments)
_SIMILAR = 0.6  # Jaccard similarity of content terms above which a sentence is redundant


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence of a text, as the scorer sees it."""

    text: str
    index: int  #: position among all sentences of the text
    paragraph: int  #: which block (paragraph, list item, heading) it is in
    lead: bool  #: the first sentence of its block
    words: int  #: number of words, stopwords included
    terms: tuple[str, ...] = field(default=())  #: content terms (stemmed), in order


# -- sentences -------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, whitespace-normalized, in order."""
    return [s.text for s in segment(text)]


def segment(text: str) -> list[Sentence]:
    """The sentences of ``text`` with their positions, word counts and content terms."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sentences: list[Sentence] = []
    paragraph = 0
    for block in _BLOCK_BREAK.split(text):
        pieces = [" ".join(p.split()) for p in _split_block(block)]
        pieces = [p for p in pieces if p]
        for i, piece in enumerate(pieces):
            sentences.append(
                Sentence(
                    text=piece,
                    index=len(sentences),
                    paragraph=paragraph,
                    lead=i == 0,
                    words=len(_WORD.findall(piece)),
                    terms=tuple(t for _, t, _ in _terms(piece)),
                )
            )
        if pieces:
            paragraph += 1
    return sentences


def _split_block(block: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    last = len(block.rstrip())
    for m in _TERMINATOR.finditer(block):
        end = m.end()
        if end >= last:
            break
        before = block[max(start, m.start() - 64):m.start()].split()
        prev = before[-1].lstrip(_OPENERS) if before and not block[m.start() - 1].isspace() else ""
        if prev.isdigit() and m.start() - start < 16 and block[start:m.start()].strip() == prev:
            continue  # a list item's number: "1. Install it"
        token = _NEXT_TOKEN.match(block, end)
        after = token.group(1) if token else ""
        if _is_boundary(m.group(), prev, after):
            pieces.append(block[start:end])
            start = end
    pieces.append(block[start:])
    return pieces


def _is_boundary(punct: str, prev: str, after: str) -> bool:
    """Whether ``punct`` (after the token ``prev``, before the token ``after``) ends a
    sentence."""
    marks = punct.rstrip(_CLOSERS)
    next_char = after[:1]
    start = _WORD_START.match(after)
    next_word = start.group() if start else ""
    if next_char.islower():
        # "e.g. this", "Yahoo! is", "wait... what": a lower-case word continues the sentence,
        # except after a plain word and a single full stop ("it ends. then sloppy text").
        return marks == "." and not _abbreviation(prev)
    if marks != ".":  # ! ? … or several dots, before a capital, digit or symbol
        return True
    word = prev.lower().rstrip(".")
    if word in _NEVER_FINAL:
        return False
    if word in _BEFORE_NUMBER and next_char.isdigit():
        return False
    if _abbreviation(prev):
        # "in the U.S. The next ..." ends; "the U.S. Army", "J. Smith" do not: only a
        # capitalized function word after an abbreviation is taken to start a sentence.
        return next_word[:1].isupper() and next_word.lower() in STOPWORDS
    return True


def _abbreviation(prev: str) -> bool:
    word = prev.lower().rstrip(".")
    if not word:
        return False
    if word in _NEVER_FINAL or word in _BEFORE_NUMBER or word in _MAYBE_FINAL:
        return True
    if len(prev) == 1 and prev.isalpha() and prev.isupper():  # an initial: "J."
        return True
    # dotted acronyms and shorthand: U.S, a.m, Ph.D (not a number like 3.14)
    return "." in word and all(part.isalpha() and len(part) <= 3 for part in word.split("."))


# -- terms and keywords ----------------------------------------------------------------------


def _terms(text: str) -> list[tuple[str, str, bool]]:
    """(surface form, term, first word of the text?) for each content word of ``text``."""
    out: list[tuple[str, str, bool]] = []
    for i, word in enumerate(_WORD.findall(text)):
        term = _term(word)
        if term is not None:
            out.append((word.replace(_APOSTROPHE, "'"), term, i == 0))
    return out


def _term(word: str) -> str | None:
    w = word.lower().replace(_APOSTROPHE, "'")
    if w in STOPWORDS:
        return None
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) < 2 or w in STOPWORDS or not any(c.isalpha() for c in w):
        return None
    if w.isascii() and not any(c.isdigit() for c in w):
        w = _stem(w)
    return w


def _stem(w: str) -> str:
    """Fold regular English plurals into the singular: models -> model, studies -> study."""
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if w.endswith("sses"):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is", "'s")):
        return w[:-1]
    return w


def keywords(text: str, top: int = 10) -> list[list[Any]]:
    """The ``top`` content words of ``text`` as ``[word, score]``, best first.

    The score is the term's frequency divided by that of the most frequent term (so the first
    keyword scores 1.0); ties go to the term that appears first. Plurals count with their
    singular; the word shown is the term's most frequent spelling, lower-cased unless it is
    capitalized wherever it does not start a sentence (``Python``, ``NASA``).
    """
    return _keywords(segment(text), top)


def _keywords(sentences: list[Sentence], top: int) -> list[list[Any]]:
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    spellings: dict[str, Counter[str]] = {}
    proper: dict[str, bool] = {}  # capitalized wherever it is not the first word
    i = 0
    for sentence in sentences:
        for surface, term, initial in _terms(sentence.text):
            counts[term] += 1
            first.setdefault(term, i)
            spellings.setdefault(term, Counter())[surface] += 1
            if not initial:
                proper[term] = proper.get(term, True) and not surface.islower()
            i += 1
    if not counts:
        return []
    most = max(counts.values())
    ranked = sorted(counts, key=lambda t: (-counts[t], first[t]))[:top]
    return [[_display(spellings[t], proper.get(t, False)), round(counts[t] / most, 3)]
            for t in ranked]


def _display(spellings: Counter[str], proper: bool) -> str:
    word = spellings.most_common(1)[0][0]
    return word if proper else word.lower()


# -- summaries -------------------------------------------------------------------------------


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def reading_seconds(words: int) -> int:
    """Seconds an average adult takes to read ``words`` words (at least 1 for any text)."""
    return math.ceil(words * 60 / WORDS_PER_MINUTE)


def score_sentences(sentences: list[Sentence]) -> list[float]:
    """A score per sentence: normalized term frequency of its content words, with a
    position bonus.

    Each content term weighs its frequency in the whole text divided by the highest such
    frequency. A sentence scores the sum of its terms' weights divided by the square root of
    their number (so long sentences are not favoured just for being long), halved when it has
    fewer than five words, then multiplied by ``1 + 0.2 * (1 - index / n)`` (earlier is
    better), by 1.1 when it leads its paragraph and by 1.1 more when it opens the text.
    """
    counts = Counter(t for s in sentences for t in s.terms)
    if not counts:
        return [0.0] * len(sentences)
    most = max(counts.values())
    n = len(sentences)
    scores: list[float] = []
    for s in sentences:
        if not s.terms:
            scores.append(0.0)
            continue
        score = sum(counts[t] / most for t in s.terms) / math.sqrt(len(s.terms))
        if s.words < _MIN_WORDS:
            score *= 0.5
        score *= 1 + 0.2 * (1 - s.index / n)
        if s.lead:
            score *= 1.1
        if s.index == 0:
            score *= 1.1
        scores.append(score)
    return scores


def select(sentences: list[Sentence], n: int) -> list[Sentence]:
    """The ``n`` best sentences in their original order.

    A sentence too similar to one already chosen (same text, or content terms overlapping by
    more than 60%) is passed over while other sentences remain; a sentence is never repeated,
    so a text that says the same thing over and over may get fewer than ``n``.
    """
    if n >= len(sentences):
        return list(sentences)
    scores = score_sentences(sentences)
    ranked = sorted(sentences, key=lambda s: (-scores[s.index], s.index))
    chosen: list[Sentence] = []
    skipped: list[Sentence] = []
    for s in ranked:
        if len(chosen) == n:
            break
        if any(_similar(s, c) for c in chosen):
            skipped.append(s)
        else:
            chosen.append(s)
    texts = {c.text for c in chosen}
    for s in skipped:  # too few distinct sentences: take near-duplicates, never repeats
        if len(chosen) == n:
            break
        if s.text not in texts:
            chosen.append(s)
            texts.add(s.text)
    return sorted(chosen, key=lambda s: s.index)


def _similar(a: Sentence, b: Sentence) -> bool:
    if a.text == b.text:
        return True
    x, y = set(a.terms), set(b.terms)
    if not x or not y:
        return False
    return len(x & y) / len(x | y) > _SIMILAR


def summarize(text: str, sentences: int = 3, top: int = 10) -> dict[str, Any]:
    """An extractive summary of ``text``: the outcome of the ``summarize`` work type.

    Returns ``{"summary": str, "sentences": [str, ...], "keywords": [[word, score], ...],
    "stats": {"words": int, "sentences": int, "reading_seconds": int}}``.
    """
    parsed = segment(text)
    chosen = select(parsed, sentences)
    words = word_count(text)
    return {
        "summary": " ".join(s.text for s in chosen),
        "sentences": [s.text for s in chosen],
        "keywords": _keywords(parsed, top),
        "stats": {
            "words": words,
            "sentences": len(parsed),
            "reading_seconds": reading_seconds(words),
        },
    }


# -- chunks ----------------------------------------------------------------------------------


def chunk(text: str, parts: int) -> list[str]:
    """``text`` cut into at most ``parts`` pieces of about equal word count, along sentence
    boundaries; paragraph breaks are kept as blank lines."""
    sentences = segment(text)
    n = len(sentences)
    parts = max(1, min(parts, n))
    weights = [max(s.words, 1) for s in sentences]
    total = sum(weights)
    groups: list[list[Sentence]] = [[] for _ in range(parts)]
    seen, last = 0, -1
    for i, (s, weight) in enumerate(zip(sentences, weights, strict=True)):
        # the part whose share of the words holds the middle of this sentence; parts are
        # contiguous, none is skipped, and enough sentences are left for the later ones
        g = min(int((seen + weight / 2) * parts / total), parts - 1)
        g = max(min(g, last + 1), last, parts - n + i)
        groups[g].append(s)
        seen += weight
        last = g
    return [_join(g) for g in groups if g]


def _join(sentences: list[Sentence]) -> str:
    out = sentences[0].text if sentences else ""
    for prev, s in itertools.pairwise(sentences):
        out += ("\n\n" if s.paragraph != prev.paragraph else " ") + s.text
    return out

"""Tests of the summarize faculty: the algorithm, the phases, and the plugin's registration.

The phases are called directly with a small stand-in for :class:`animus_core.Focus` (the work
item's id, type and params, and a ``submit`` that records child work), so no database is
needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import animus_faculty_summarize
import pytest
from animus_faculty_summarize import MAX_CHARS, InvalidParams, Summarize
from animus_faculty_summarize.extract import (
    STOPWORDS,
    chunk,
    keywords,
    score_sentences,
    segment,
    select,
    split_sentences,
    summarize,
)

from animus_core import NewWorkItem

# -- a stand-in for Focus -----------------------------------------------------------------


class FakeFocus:
    """What the faculty uses of a Focus: ``work`` (id, work_type, params), ``log``, ``submit``."""

    def __init__(self, work_type: str, params: Any) -> None:
        self.work = SimpleNamespace(id=uuid4(), work_type=work_type, params=params)
        self.log = logging.getLogger("test")
        self.submitted: list[NewWorkItem] = []

    async def submit(self, item: NewWorkItem) -> Any:
        self.submitted.append(item)
        return SimpleNamespace(canonical_id=uuid4())


def run(work_type: str, params: Any) -> tuple[dict[str, Any], FakeFocus]:
    """orient -> engage -> consolidate, as the engine calls them; the outcome and the focus."""
    faculty, focus = Summarize(), FakeFocus(work_type, params)

    async def phases() -> dict[str, Any]:
        oriented = faculty.orient(focus)  # type: ignore[arg-type]
        engaged = await faculty.engage(focus, oriented)  # type: ignore[arg-type]
        return await faculty.consolidate(focus, engaged)  # type: ignore[arg-type]

    outcome = asyncio.run(phases())
    json.dumps(outcome, allow_nan=False)  # the engine refuses outcomes JSON cannot hold
    return outcome, focus


ARTICLE = """\
Solar panels turn sunlight into electricity. Most panels on roofs today are made of silicon \
cells. A typical silicon panel converts about 20 percent of the sunlight that reaches it.

The price of solar panels fell by roughly 90 percent between 2010 and 2020. Cheaper panels \
made solar electricity one of the cheapest sources of new power in many countries. My \
neighbour says the installers were friendly.

Panels produce no electricity at night, so solar power is often paired with batteries. \
Batteries store the electricity that panels make at noon and release it in the evening.
"""


# -- sentences -----------------------------------------------------------------------------


def test_split_handles_abbreviations_decimals_and_initials() -> None:
    text = (
        "Dr. Smith measured 3.14 litres, e.g. in the lab. Mr. and Mrs. Jones agreed, i.e. "
        "they signed. The U.S. Army paid $2.50 each. J. R. R. Tolkien liked it. See Fig. 2 "
        "and No. 7 for details. The firm moved to the U.S. The costs rose."
    )
    assert split_sentences(text) == [
        "Dr. Smith measured 3.14 litres, e.g. in the lab.",
        "Mr. and Mrs. Jones agreed, i.e. they signed.",
        "The U.S. Army paid $2.50 each.",
        "J. R. R. Tolkien liked it.",
        "See Fig. 2 and No. 7 for details.",
        "The firm moved to the U.S.",
        "The costs rose.",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Is it? Yes! Fine.", ["Is it?", "Yes!", "Fine."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("(See the notes.) Next one.", ["(See the notes.)", "Next one."]),
        ("Wait... what now? Later… Yes.", ["Wait... what now?", "Later…", "Yes."]),
        ("Yahoo! is a company. Acme Inc. reported gains.",
         ["Yahoo! is a company.", "Acme Inc. reported gains."]),
        ("Apples, pears, etc. The rest is fruit too.",
         ["Apples, pears, etc.", "The rest is fruit too."]),
        ("Version 2.0 shipped at 5 p.m. on Friday.", ["Version 2.0 shipped at 5 p.m. on Friday."]),
        ("No full stop at the end", ["No full stop at the end"]),
        ("  One.\r\n\r\n   Two  words.  ", ["One.", "Two words."]),
        ("Intro:\n- first item\n- second item\n1. Numbered item. Another.\n\nEnd.",
         ["Intro:", "- first item", "- second item", "1. Numbered item.", "Another.", "End."]),
        ("A line that\nwraps in the middle. Next.", ["A line that wraps in the middle.", "Next."]),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_segment_records_paragraphs_and_leads() -> None:
    sentences = segment(ARTICLE)
    assert [s.paragraph for s in sentences] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [s.lead for s in sentences] == [True, False, False, True, False, False, True, False]
    assert [s.index for s in sentences] == list(range(8))
    assert sentences[0].words == 6
    assert sentences[0].terms == ("solar", "panel", "turn", "sunlight", "electricity")


# -- summaries -----------------------------------------------------------------------------


def test_summary_is_the_top_sentences_in_original_order() -> None:
    sentences = segment(ARTICLE)
    scores = score_sentences(sentences)
    for n in range(1, len(sentences)):
        chosen = select(sentences, n)
        assert len(chosen) == n
        assert [s.index for s in chosen] == sorted(s.index for s in chosen)
        best = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:n]
        assert {s.index for s in chosen} == set(best)  # no near-duplicates in this text


def test_summary_prefers_central_sentences_over_asides() -> None:
    outcome = summarize(ARTICLE, 3)
    assert len(outcome["sentences"]) == 3
    assert outcome["summary"] == " ".join(outcome["sentences"])
    assert outcome["sentences"][0] == "Solar panels turn sunlight into electricity."
    assert all("neighbour" not in s for s in outcome["sentences"])
    order = [ARTICLE.replace("\n", " ").index(s) for s in outcome["sentences"]]
    assert order == sorted(order)


def test_summary_skips_near_duplicates_and_never_repeats() -> None:
    text = (
        "Cats sleep most of the day in warm places. Cats sleep most of the day in warm "
        "places! Dogs bark at strangers near the house. Fish swim in cold water."
    )
    assert summarize(text, 2)["sentences"] == [
        "Cats sleep most of the day in warm places.",
        "Dogs bark at strangers near the house.",
    ]
    assert summarize("Same thing. " * 5, 3)["sentences"] == ["Same thing."]


def test_asking_for_more_sentences_than_the_text_has_returns_all() -> None:
    outcome = summarize("First point here. Second point here.", 5)
    assert outcome["sentences"] == ["First point here.", "Second point here."]


def test_stats() -> None:
    stats = summarize(ARTICLE, 2)["stats"]
    words = len(re.findall(r"\w+(?:'\w+)?", ARTICLE))
    assert stats == {"words": words, "sentences": 8, "reading_seconds": -(-words * 60 // 238)}
    assert summarize("Hi.", 1)["stats"] == {"words": 1, "sentences": 1, "reading_seconds": 1}


# -- keywords ------------------------------------------------------------------------------


def test_keywords_exclude_stopwords_and_numbers() -> None:
    text = "The the THE and of it is 2020 42. " * 5 + "Panels and batteries. Panel prices fell."
    found = keywords(text, 10)
    words = [w for w, _ in found]
    assert found[0] == ["panels", 1.0]  # "Panels" and "Panel" are one term
    assert not set(words) & STOPWORDS
    assert not any(w.isdigit() for w in words)
    assert keywords("The and of it is.", 5) == []


def test_keywords_are_ranked_by_normalized_frequency() -> None:
    found = keywords(ARTICLE, 4)
    assert len(found) == 4
    assert found[0] == ["panels", 1.0]
    scores = [score for _, score in found]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < score <= 1 for score in scores)
    assert [w for w, _ in found][1:3] == ["solar", "electricity"]


def test_keywords_keep_proper_nouns_capitalized() -> None:
    words = [w for w, _ in keywords("Python is great. I like Python. Snakes are not python.")]
    assert words[0] == "python"
    words = [w for w, _ in keywords("NASA uses Python. Python is fast. We like NASA and Python.")]
    assert words[:2] == ["Python", "NASA"]
    words = [w for w, _ in keywords("Rivers flow. Rivers flood. Big rivers matter.")]
    assert words[0] == "rivers"


# -- the faculty ---------------------------------------------------------------------------


def test_faculty_declaration() -> None:
    faculty = Summarize()
    assert faculty.name == "summarize"
    assert faculty.accepts == ("summarize", "keywords")
    assert faculty.max_concurrent == 4
    assert faculty.describe()
    assert Summarize.example is not None
    assert Summarize.example["sentences"] == 2
    assert len(split_sentences(str(Summarize.example["text"]))) > 5


def test_summarize_work() -> None:
    outcome, focus = run("summarize", {"text": ARTICLE, "sentences": 2})
    assert set(outcome) == {"summary", "sentences", "keywords", "stats"}
    assert len(outcome["sentences"]) == 2
    assert outcome["keywords"][0] == ["panels", 1.0]
    assert outcome["stats"]["sentences"] == 8
    assert focus.submitted == []


def test_summarize_defaults_to_three_sentences() -> None:
    outcome, _ = run("summarize", {"text": ARTICLE})
    assert len(outcome["sentences"]) == 3


def test_the_example_runs() -> None:
    assert Summarize.example is not None
    outcome, _ = run("summarize", dict(Summarize.example))
    assert len(outcome["sentences"]) == 2
    assert outcome["keywords"][0][0] == "dance"


def test_keywords_work() -> None:
    outcome, _ = run("keywords", {"text": ARTICLE, "top": 3})
    assert outcome == {"keywords": keywords(ARTICLE, 3)}
    outcome, _ = run("keywords", {"text": ARTICLE})
    assert len(outcome["keywords"]) == 10


def test_long_text_is_worked_on_in_a_thread() -> None:
    text = ARTICLE * 100
    assert len(text) > 50_000
    outcome, _ = run("summarize", {"text": text, "sentences": 2})
    assert outcome["stats"]["sentences"] == 800
    assert len(outcome["sentences"]) == 2


@pytest.mark.parametrize(
    ("work_type", "params", "message"),
    [
        ("summarize", {}, r"params\.text must be a non-empty string \(it is missing\)"),
        ("summarize", {"text": ""}, r"params\.text must be a non-empty string"),
        ("summarize", {"text": "  \n "}, r"params\.text must be a non-empty string"),
        ("summarize", {"text": 42}, r"params\.text must be a non-empty string \(got 42\)"),
        ("summarize", {"text": "x" * (MAX_CHARS + 1)}, r"params\.text is too long"),
        ("summarize", {"text": "Hi.", "sentences": 0}, r"params\.sentences must be an integer"),
        ("summarize", {"text": "Hi.", "sentences": "3"}, r"params\.sentences .* \(got '3'\)"),
        ("summarize", {"text": "Hi.", "sentences": True}, r"params\.sentences"),
        ("summarize", {"text": "Hi.", "sentences": 2.5}, r"params\.sentences"),
        ("summarize", {"text": "Hi.", "split_into": 1}, r"params\.split_into .* at least 2"),
        ("summarize", {"text": "Hi.", "sentence": 2}, r"params\.sentence is not a known param"),
        ("summarize", {"text": "Hi.", "top": 2}, r"params\.top is not a known param"),
        ("keywords", {"text": None}, r"params\.text must be a non-empty string"),
        ("keywords", {"text": "Hi.", "top": -1}, r"params\.top must be an integer of at least 1"),
        ("keywords", {"text": "Hi.", "sentences": 2}, r"params\.sentences is not a known"),
        ("keywords", ["not", "an", "object"], r"params must be a JSON object"),
    ],
)
def test_bad_params_raise_value_error_naming_the_param(
    work_type: str, params: Any, message: str
) -> None:
    focus = FakeFocus(work_type, params)
    with pytest.raises(ValueError, match=message) as caught:
        Summarize().orient(focus)  # type: ignore[arg-type]
    assert isinstance(caught.value, InvalidParams)


def test_bad_params_are_dead_lettered_other_failures_retried() -> None:
    faculty, focus = Summarize(), FakeFocus("summarize", {})
    bad = "InvalidParams: params.text must be a non-empty string (it is missing)"
    assert faculty.recover(focus, bad, "orient") is False  # type: ignore[arg-type]
    assert faculty.recover(focus, "timed out after 60s", "engage") is None  # type: ignore[arg-type]
    assert faculty.recover(focus, "KeyError: 'x'", "orient") is None  # type: ignore[arg-type]


# -- splitting into child work ------------------------------------------------------------


def test_split_into_submits_a_child_summarize_item_per_part() -> None:
    text = "\n\n".join([ARTICLE] * 3)
    outcome, focus = run("summarize", {"text": text, "sentences": 2, "split_into": 3})
    assert len(focus.submitted) == 3
    parts = []
    for i, item in enumerate(focus.submitted, start=1):
        sent = item.to_json()
        assert sent["work_type"] == "summarize"
        assert sent["source"] == "summarize"
        assert sent["dedup_key"] == f"{focus.work.id}/part-{i}-of-3"
        assert set(sent["params"]) == {"text", "sentences"}
        assert sent["params"]["sentences"] == 2
        parts.append(sent["params"]["text"])
    # the parts are the text, in order, cut at sentence boundaries
    assert [s for p in parts for s in split_sentences(p)] == split_sentences(text)
    assert parts[0] == ARTICLE.strip()  # paragraph breaks are kept
    children = outcome.pop("children")
    assert [c["part"] for c in children] == [1, 2, 3]
    assert all(UUID(c["id"]) and c["merged"] is False and c["words"] > 0 for c in children)
    assert outcome == summarize(text, 2)  # the whole text is summarized as well


def test_split_into_is_ignored_for_short_text() -> None:
    outcome, focus = run("summarize", {"text": ARTICLE, "sentences": 4, "split_into": 4})
    assert focus.submitted == []
    assert outcome["children"] == []


def test_chunk_balances_parts_along_sentences() -> None:
    text = " ".join(f"Sentence number {i} has exactly six words." for i in range(12))
    parts = chunk(text, 4)
    assert [len(split_sentences(p)) for p in parts] == [3, 3, 3, 3]
    assert chunk(text, 1) == [text]
    assert len(chunk("One. Two.", 5)) == 2
    lopsided = "Short one. " + "A much longer sentence " * 30 + "ends here. Tail. End."
    assert [len(split_sentences(p)) for p in chunk(lopsided, 3)] == [1, 1, 2]


# -- the plugin ----------------------------------------------------------------------------


def test_entry_point_is_discoverable() -> None:
    found = {ep.name: ep for ep in entry_points(group="animus")}
    assert "summarize" in found
    ep = found["summarize"]
    assert ep.value == "animus_faculty_summarize"
    assert ep.dist is not None
    assert ep.dist.name == "animus-faculty-summarize"
    assert ep.load() is animus_faculty_summarize


def test_the_plugin_registers_the_faculty() -> None:
    registered: list[object] = []
    animus_faculty_summarize.register_faculties(registered.append)
    assert len(registered) == 1
    assert isinstance(registered[0], Summarize)


def test_the_engine_loads_the_plugin(tmp_path: Path) -> None:
    """Through animus's own plugin manager: entry point, hook and phase signatures."""
    from animus_core.faculties.plugins import collect_faculties, make_plugin_manager
    from animus_core.infra.config import Settings

    settings = Settings(home=tmp_path, faculties_dir=tmp_path, plugins_allow=("summarize",))
    pm, problems = make_plugin_manager(settings, load_entry_points=True)
    assert problems == []
    faculties, problems = asyncio.run(collect_faculties(pm, settings))
    assert problems == []
    faculty = faculties.by_type["summarize"]
    assert isinstance(faculty, Summarize)
    assert faculties.by_type["keywords"] is faculty
    assert "animus-faculty-summarize 0.1.0" in faculty.origin

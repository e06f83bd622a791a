"""The ``summarize`` faculty for animus: extractive summaries and keywords of plain text.

Installed, this module is an animus plugin (entry point ``summarize`` in the ``animus``
group): its :func:`register_faculties` hook registers one :class:`Summarize` faculty, which
accepts two work types.

``summarize``
    params ``{"text": str, "sentences": int = 3, "split_into": int | None = None}``;
    outcome ``{"summary": str, "sentences": [str, ...], "keywords": [[word, score], ...],
    "stats": {"words": int, "sentences": int, "reading_seconds": int}}``. With
    ``split_into`` (2 or more) and a text long enough, the text is also cut into that many
    parts of about equal length and each part is submitted as a child ``summarize`` item;
    the outcome then lists them under ``"children"``.

``keywords``
    params ``{"text": str, "top": int = 10}``; outcome ``{"keywords": [[word, score], ...]}``.

Everything is computed in pure Python (see :mod:`animus_faculty_summarize.extract`): no
model, no network. Bad params fail the item in ``orient`` with a :class:`InvalidParams`
(a ``ValueError``) naming the param, and such an item is dead-lettered at once rather than
retried, since retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from animus_core import Faculty, Focus, Merged, NewWorkItem, hookimpl

from .extract import chunk, keywords, summarize, word_count

__all__ = ["InvalidParams", "Summarize", "register_faculties"]

__version__ = "0.1.0"

#: Longest text accepted, in characters.
MAX_CHARS = 1_000_000
#: Longer texts are worked on in a thread, so the engine's event loop is not held up.
_INLINE_CHARS = 50_000

_EXAMPLE_TEXT = """\
Honeybees share the location of food through a behaviour called the waggle dance. A forager \
returning to the hive runs in a straight line across the vertical comb while shaking her \
body, then loops back and repeats the run. The angle of the run relative to vertical matches \
the angle between the food and the sun, and the length of the waggle tells the distance.

The Austrian biologist Dr. Karl von Frisch decoded the dance, and he shared the 1973 Nobel \
Prize in Physiology or Medicine for the work. His experiments moved feeding stations step by \
step (e.g. a few hundred metres at a time) and watched how the dances of the bees changed. \
Later studies that tracked recruits by radar confirmed that they use the direction and \
distance given in the dance.

The dance is not a perfect map. Recruits search around the indicated spot, and the scent of \
the flowers carried by the dancer helps them find it. Still, colonies that can read the \
dance gather more food when flowers are patchy, so the waggle dance seems worth its cost.
"""


class InvalidParams(ValueError):
    """The work item's params are unusable; the message names the param."""


class Summarize(Faculty):
    """Extractive summaries and keywords of plain text (pure Python, no model)."""

    name = "summarize"
    accepts = ("summarize", "keywords")
    max_concurrent = 4
    timeout = 60.0
    example: ClassVar[dict[str, object] | None] = {"text": _EXAMPLE_TEXT, "sentences": 2}

    #: Keywords listed in a ``summarize`` outcome.
    summary_keywords: ClassVar[int] = 10

    def orient(self, focus: Focus) -> dict[str, Any]:
        """Check the params; return them complete, with defaults filled in."""
        work_type = focus.work.work_type
        params = focus.work.params
        if not isinstance(params, Mapping):
            raise InvalidParams(f"params must be a JSON object, got {type(params).__name__}")
        if work_type == "keywords":
            _no_unknown(params, ("text", "top"))
            return {"text": _text(params), "top": _count(params, "top", 10)}
        if work_type == "summarize":
            _no_unknown(params, ("text", "sentences", "split_into"))
            oriented: dict[str, Any] = {
                "text": _text(params),
                "sentences": _count(params, "sentences", 3),
            }
            if params.get("split_into") is not None:
                oriented["split_into"] = _count(params, "split_into", 2, least=2)
            return oriented
        raise InvalidParams(f"work type {work_type!r} is not one of {list(self.accepts)}")

    async def engage(self, focus: Focus, oriented: dict[str, Any]) -> dict[str, Any]:
        """Compute the outcome; for a split, also the parts (under ``"chunks"``)."""
        if len(oriented["text"]) > _INLINE_CHARS:  # tens of ms or more: keep the loop free
            return await asyncio.to_thread(self._compute, oriented)
        return self._compute(oriented)

    def _compute(self, oriented: dict[str, Any]) -> dict[str, Any]:
        text: str = oriented["text"]
        if "top" in oriented:
            return {"keywords": keywords(text, oriented["top"])}
        n: int = oriented["sentences"]
        outcome = summarize(text, n, self.summary_keywords)
        split_into: int | None = oriented.get("split_into")
        if split_into:
            # a part must hold more sentences than its summary keeps, or it would not shrink
            parts = min(split_into, outcome["stats"]["sentences"] // (n + 1))
            outcome["chunks"] = chunk(text, parts) if parts >= 2 else []
        return outcome

    async def consolidate(self, focus: Focus, engaged: dict[str, Any]) -> dict[str, Any]:
        """Submit a child ``summarize`` item per part of a split; return the outcome."""
        chunks: list[str] | None = engaged.pop("chunks", None)
        if chunks is None:
            return engaged
        children: list[dict[str, Any]] = []
        n = focus.work.params.get("sentences", 3)  # checked by orient
        for part, text in enumerate(chunks, start=1):
            item = (
                NewWorkItem("summarize", source=self.name, trigger="split_into")
                .dedup_key(f"{focus.work.id}/part-{part}-of-{len(chunks)}")
                .params({"text": text, "sentences": n})
            )
            result = await focus.submit(item)
            children.append({
                "id": str(result.canonical_id),
                "part": part,
                "words": word_count(text),
                "merged": isinstance(result, Merged),
            })
        engaged["children"] = children
        return engaged

    def recover(self, focus: Focus, error: str, phase: str) -> bool | None:
        """Dead-letter items with bad params at once; retry anything else."""
        if phase == "orient" and error.startswith(f"{InvalidParams.__name__}:"):
            return False
        return None


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(Summarize())


def _no_unknown(params: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        raise InvalidParams(
            f"params.{unknown[0]} is not a known param (expected: {', '.join(known)})"
        )


def _text(params: Mapping[str, Any]) -> str:
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        got = "it is missing" if text is None else f"got {_show(text)}"
        raise InvalidParams(f"params.text must be a non-empty string ({got})")
    if len(text) > MAX_CHARS:
        raise InvalidParams(
            f"params.text is too long: {len(text)} characters, at most {MAX_CHARS}"
        )
    return text


def _count(params: Mapping[str, Any], key: str, default: int, *, least: int = 1) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidParams(
            f"params.{key} must be an integer of at least {least} (got {_show(value)})"
        )
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

"""What an agent run is and what it cost: the spec of a run of the Claude engage loop, its
result, and token usage priced per model. Shared by :class:`animus_core.Focus` (which keeps
a focus's usage) and :mod:`animus_core.faculties.llm` (which runs the loop)."""

from __future__ import annotations

from typing import Any

import msgspec

from animus_core.values.mcp import McpServer

__all__ = ["PRICES", "AgentResult", "AgentSpec", "Usage"]

#: USD per million tokens: (input, output), by model-name prefix (the longest matching
#: prefix wins). Cache writes cost 1.25x input, reads 0.1x.
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4": (15.0, 75.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
}


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
                + self.cache_read_input_tokens)

    def add(self, usage: Any) -> None:
        self.input_tokens += getattr(usage, "input_tokens", 0) or 0
        self.output_tokens += getattr(usage, "output_tokens", 0) or 0
        self.cache_creation_input_tokens += getattr(usage, "cache_creation_input_tokens", 0) or 0
        self.cache_read_input_tokens += getattr(usage, "cache_read_input_tokens", 0) or 0

    def cost_usd(self, model: str) -> float | None:
        prefixes = [prefix for prefix in PRICES if model.startswith(prefix)]
        if not prefixes:
            return None
        inp, out = PRICES[max(prefixes, key=len)]
        return round((self.input_tokens * inp + self.output_tokens * out
                      + self.cache_creation_input_tokens * inp * 1.25
                      + self.cache_read_input_tokens * inp * 0.1) / 1e6, 6)


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    system: str = ""
    tools: list[str] = []
    #: MCP servers whose tools the model may use too (:mod:`animus_core.values.mcp`)
    mcp: list[McpServer] = []
    max_turns: int = 20
    max_tokens: int = 4096
    #: stop the loop cleanly once this many tokens (all kinds) are spent; None: no budget
    token_budget: int | None = None
    stream: bool = True
    temperature: float | None = None


class AgentResult(msgspec.Struct, kw_only=True):
    text: str
    stop_reason: str
    turns: int
    usage: Usage
    cost_usd: float | None
    model: str
    transcript: list[dict[str, Any]]

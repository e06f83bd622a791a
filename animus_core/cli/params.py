"""Work parameters on the command line: ``-p K=V`` (repeatable) and ``--params JSON``, as
``animus work submit`` and ``animus rules test`` take them."""

from __future__ import annotations

import json
from typing import Any

from animus_core.values import json_values
from animus_core.values.errors import InvalidInput

__all__ = ["parse_params"]


def parse_params(pairs: list[str], raw: str | None) -> dict[str, Any]:
    """The params of ``--params`` (a JSON object) with each ``K=V`` of ``pairs`` on top: V
    is JSON when it reads as JSON, else the text itself."""
    params: dict[str, Any] = {}
    if raw is not None:
        params = json_values.decode(raw, "--params")
        if not isinstance(params, dict):
            raise InvalidInput(f"--params must be a JSON object, got {type(params).__name__}")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--param {pair!r:.80} must look like key=value")
        try:  # NaN and 1e400 read as numbers here, and are then refused as such
            params[key] = json.loads(value)
        except RecursionError:
            raise InvalidInput(f"--param {key}: nested more than {json_values.MAX_DEPTH} "
                               "levels deep") from None
        except json.JSONDecodeError:
            params[key] = value  # not JSON: the text itself
    return params

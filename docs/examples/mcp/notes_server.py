"""An MCP server that keeps notes in a JSON file ($NOTES_DIR/notes.json), built with the
official ``mcp`` SDK: the example of docs/agents.md, Tools from MCP servers.

    python3 notes_server.py      # speaks MCP on stdin and stdout
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer

server = MCPServer("notes")


def _file() -> Path:
    return Path(os.environ.get("NOTES_DIR", ".")) / "notes.json"


def _notes() -> list[dict[str, object]]:
    file = _file()
    return json.loads(file.read_text()) if file.exists() else []


def _save(notes: list[dict[str, object]]) -> None:
    _file().write_text(json.dumps(notes, indent=1))


@server.tool()
def add_note(text: str) -> dict[str, object]:
    """Keep a note; answers it with its id."""
    notes = _notes()
    note = {"id": max((int(str(n["id"])) for n in notes), default=0) + 1, "text": text}
    _save([*notes, note])
    return note


@server.tool()
def find_notes(query: str) -> list[dict[str, object]]:
    """The notes whose text contains the query (case ignored)."""
    return [n for n in _notes() if query.lower() in str(n["text"]).lower()]


@server.tool()
def delete_note(id: int) -> str:
    """Delete a note for good."""
    notes = _notes()
    kept = [n for n in notes if n["id"] != id]
    if len(kept) == len(notes):
        raise ValueError(f"no note {id}")
    _save(kept)
    return f"deleted note {id}"


if __name__ == "__main__":
    server.run()

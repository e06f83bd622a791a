"""An MCP server a faculty's Claude engage loop takes tools from, as a faculty declares it
(``[[faculty.engage.mcp]]`` in TOML, ``focus.agent(mcp=[...])`` in Python). The connection is
:mod:`animus_core.faculties.mcp`'s; see docs/agents.md, Tools from MCP servers."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from animus_core.values.errors import ConfigError
from animus_core.values.records import file_digest

__all__ = ["McpServer", "tool_name"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: what the Messages API takes as a tool's name
_TOOL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: an HTTP header's name (RFC 9110 token), and ``${VAR}`` in its value
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_REFERENCE = re.compile(r"\$\{([^}]*)\}")
#: headers the MCP transport sets itself
_OWN_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding",
                          "connection", "accept"})


class McpServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One MCP server: started as ``command`` with ``args`` (stdio), or reached at ``url``
    (streamable HTTP) with ``headers``, whose values may take ``${VAR}`` from the variables
    named in ``env``. Its tools join the model's as ``mcp__NAME__TOOL``; ``tools`` allows
    a subset (None: all it lists). A stdio server sees only the environment variables named
    in ``env`` (and PATH, HOME and the like, which the SDK passes). Each call may take
    ``timeout`` seconds and return ``max_result_bytes``; a call of a tool in
    ``requires_approval`` waits for a person first, as for built-in tools."""

    name: str
    command: str | None = None
    args: list[str] = []
    url: str | None = None
    headers: dict[str, str] = {}
    env: list[str] = []
    tools: list[str] | None = None
    timeout: float = 60.0
    start_timeout: float = 30.0
    max_result_bytes: int = 65536
    requires_approval: list[str] = []
    approval_role: str = "approver"
    approval_quorum: int = 1

    def check(self, where: str) -> None:
        """Refuse a declaration that cannot work, naming the field."""
        at = f"{where}: mcp server {self.name!r:.40}"
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"{where}: mcp server name {self.name!r:.40} must be 1-32 "
                              "letters, digits, _ or -")
        if (self.command is None) == (self.url is None):
            raise ConfigError(f"{at}: give command (a stdio server) or url (streamable HTTP), "
                              "one of them")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{at}: url must be http:// or https://, got {self.url!r:.80}")
        if self.url is not None and self.args:
            raise ConfigError(f"{at}: args are for a server animus starts (command)")
        if self.url is None and self.headers:
            raise ConfigError(f"{at}: headers are for a server reached at a url")
        for header, text in self.headers.items():
            if not _HEADER.fullmatch(header) or not isinstance(text, str) or \
                    any(c in text for c in "\r\n\0"):
                raise ConfigError(f"{at}: headers: {header!r:.60} is not an HTTP header name, "
                                  "or its value is not one line of text")
            if header.lower() in _OWN_HEADERS or header.lower().startswith("mcp-"):
                raise ConfigError(f"{at}: headers: {header} is the MCP transport's own to "
                                  "send")
            missing = [n for n in _REFERENCE.findall(text) if n not in self.env]
            if missing:
                raise ConfigError(f"{at}: headers.{header} takes ${{{missing[0]:.60}}}, which "
                                  f"env does not name (env = [{missing[0]!r:.60}], declared in "
                                  "the faculty's env or secrets too)")
        for name in self.env:
            if not _VARIABLE.fullmatch(name):
                raise ConfigError(f"{at}: env: {name!r:.60} is not an environment variable "
                                  "name")
        for field, value, high in (("timeout", self.timeout, 86400.0),
                                   ("start_timeout", self.start_timeout, 3600.0)):
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= high):
                raise ConfigError(f"{at}: {field} must be more than 0 and at most {high:g} "
                                  f"seconds, got {value!r}")
        if not 1 <= self.max_result_bytes <= 16 * 1024 * 1024:
            raise ConfigError(f"{at}: max_result_bytes must be from 1 to 16777216, got "
                              f"{self.max_result_bytes}")
        for tool in [*(self.tools or []), *self.requires_approval]:
            if not _TOOL.fullmatch(tool_name(self.name, tool)):
                raise ConfigError(f"{at}: tool {tool!r:.60} makes the name "
                                  f"{tool_name(self.name, tool)!r:.80}, which the model's API "
                                  "refuses (1-64 letters, digits, _ or -)")
        unknown = sorted(set(self.requires_approval) - set(self.tools or self.requires_approval))
        if unknown:
            raise ConfigError(f"{at}: requires_approval names {unknown}, which tools does not "
                              "allow")

    def header_variables(self) -> list[str]:
        """The variables ``headers`` take values from."""
        return sorted({n for v in self.headers.values() for n in _REFERENCE.findall(v)})

    def http_headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``headers`` with each ``${VAR}`` replaced by its value in ``environ``; a value
        that would not be one clean line of text is refused, naming the variable only."""
        def value(m: re.Match[str]) -> str:
            if m[1] not in environ:
                raise ConfigError(f"mcp server {self.name!r}: a header takes ${{{m[1]}}}, which "
                                  "the engine's environment does not set")
            text = environ[m[1]]
            if text != text.strip() or any(c in text for c in "\r\n\0"):
                raise ConfigError(f"mcp server {self.name!r}: ${m[1]} holds a line break, a NUL "
                                  "or spaces at an end, which no header may carry")
            return text
        return {h: _REFERENCE.sub(value, v) for h, v in self.headers.items()}

    def identity(self) -> dict[str, Any]:
        """What a call was bound to, for the execution record: the URL, or the command with
        its executable's digest and the digest of each file an absolute argument names."""
        ident: dict[str, Any] = {"name": self.name}
        if self.url is not None:
            ident["url"] = self.url
            if self.headers:
                ident["headers"] = sorted(self.headers)  # their names: values may be secrets
        else:
            assert self.command is not None
            found = shutil.which(self.command)
            ident["command"] = " ".join([self.command, *self.args])
            ident["sha256"] = file_digest(Path(found)) if found else "not found"
            files = {a: file_digest(Path(a)) for a in self.args
                     if os.path.isabs(a) and os.path.isfile(a)}
            if files:
                ident["files"] = files
        if self.tools is not None:
            ident["tools"] = sorted(self.tools)
        return ident


def tool_name(server: str, tool: str) -> str:
    """The name the model knows a server's tool by."""
    return f"mcp__{server}__{tool}"

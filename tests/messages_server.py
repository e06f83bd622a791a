"""A local Anthropic Messages API for the tests: ``POST /v1/messages``, JSON or streaming.

The real ``anthropic`` SDK talks to it over a real socket (``base_url=server.url``; the SDK
appends ``/v1/messages``). Answers are scripted turn by turn: each request consumes the next
scripted behaviour, and a request with nothing left in the script is answered ``500`` with
an ``api_error`` saying so (a test that talks more than it scripted fails loudly).

* :class:`Reply` answers a message: optional text, then ``tool_use`` blocks
  (:class:`ToolUse`), with its own token :class:`Tokens` and stop reason. Without
  ``"stream": true`` in the request it is one JSON body; with it, server-sent events
  exactly as the real API streams them (``message_start``, ``content_block_start``,
  ``ping``, ``content_block_delta`` with ``text_delta`` / ``input_json_delta`` chunks,
  ``content_block_stop``, ``message_delta`` with ``stop_reason`` and
  ``usage.output_tokens``, ``message_stop``), chunked over HTTP/1.1.
* :class:`Fail` answers an HTTP error with the API's error body
  ``{"type": "error", "error": {"type": ..., "message": ...}}`` (529 ``overloaded_error``,
  429 ``rate_limit_error``, 500 ``api_error``, 400 ``invalid_request_error``, ...) and a
  ``retry-after-ms`` header, so the SDK's own retries are fast and deterministic.
* :class:`StreamError` starts a streamed message and then sends an ``event: error`` (as
  the API does when it is overloaded mid-stream).
* :class:`Hold` answers nothing until :meth:`MessagesServer.release`: a response held back
  while a test kills its client (``holding`` says a request is being held).

Like the real API, the server checks what it is sent (``strict``, on by default) and answers
``400 invalid_request_error`` naming the offending field: unknown keys in content blocks
(``Extra inputs are not permitted``), roles that do not alternate, ``tool_use`` blocks
without a ``tool_result`` in the next message (and the reverse), more than four
``cache_control`` breakpoints, tool names the API refuses. With ``api_key`` set it also
answers ``401 authentication_error`` to any other key (sent as ``x-api-key``, or as
``Authorization: Bearer`` as recent SDK versions do).

Every request is recorded (method, path, lower-cased headers, decoded JSON body)::

    with MessagesServer() as server:
        server.script(Reply(tool_uses=[ToolUse("lookup", {"city": "Oslo"})]),
                      Reply(text="It is cold."))
        client = make_client(api_key="k", base_url=server.url)
        ...
        assert server.requests[1].tool_results()[0]["tool_use_id"] == ...
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Fail",
    "Hold",
    "MessagesServer",
    "Recorded",
    "Reply",
    "StreamError",
    "Tokens",
    "ToolUse",
    "serving",
]

_ids = itertools.count(1)
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: the keys the API accepts in each kind of content block sent to it
_BLOCK_KEYS = {
    "text": {"type", "text", "cache_control", "citations"},
    "tool_use": {"type", "id", "name", "input", "cache_control", "caller"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
    "image": {"type", "source", "cache_control"},
}
_TOOL_KEYS = {"name", "description", "input_schema", "cache_control", "type"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


@dataclass(frozen=True)
class Tokens:
    """The ``usage`` of one answer."""

    input_tokens: int = 10
    output_tokens: int = 5
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_creation_input_tokens": self.cache_creation_input_tokens,
                "cache_read_input_tokens": self.cache_read_input_tokens}


@dataclass(frozen=True)
class ToolUse:
    """One ``tool_use`` block; ``id`` is generated (``toolu_...``) unless given."""

    name: str
    input: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    """A message: ``text`` (if any) then the tool uses. ``stop_reason`` defaults to
    ``tool_use`` when there are tool uses, else ``end_turn``."""

    text: str = ""
    tool_uses: tuple[ToolUse, ...] | list[ToolUse] = ()
    usage: Tokens = Tokens()
    stop_reason: str | None = None
    model: str | None = None  # default: the requested model


@dataclass(frozen=True)
class Fail:
    """An HTTP error with the API's error body; ``error_type`` defaults from the status."""

    status: int
    message: str = "scripted failure"
    error_type: str | None = None
    retry_after_ms: int | None = 10
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.error_type or _ERROR_TYPES.get(self.status, "api_error")


@dataclass(frozen=True)
class StreamError:
    """Streaming only: ``message_start`` then ``event: error`` with this error."""

    error_type: str = "overloaded_error"
    message: str = "Overloaded"


@dataclass(frozen=True)
class Hold:
    """Take the request and answer nothing until :meth:`MessagesServer.release` (or
    ``seconds``); then close the connection unanswered."""

    seconds: float = 120.0


Behaviour = Reply | Fail | StreamError | Hold


@dataclass
class Recorded:
    """One request as the server received it, and how it was answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # decoded JSON (None if it was not JSON)
    answered: str = ""  # "Reply", "Fail 529", "StreamError", "invalid: ...", ...
    streamed: bool = False

    @property
    def api_key(self) -> str | None:
        """The key the client sent: ``x-api-key``, or the ``Authorization: Bearer`` token
        (which recent SDK versions use for API keys too)."""
        key = self.headers.get("x-api-key")
        if key is None:
            scheme, _, token = self.headers.get("authorization", "").partition(" ")
            key = token if scheme.lower() == "bearer" and token else None
        return key

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []

    def tool_results(self) -> list[dict[str, Any]]:
        """The ``tool_result`` blocks of the last (user) message."""
        if not self.messages:
            return []
        content = self.messages[-1].get("content")
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


@dataclass
class _State:
    api_key: str | None
    strict: bool
    script: deque[Behaviour] = field(default_factory=deque)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    holding: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


def _content_blocks(message: dict[str, Any]) -> list[Any]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def validate(body: Any) -> str | None:
    """What the real API would refuse in ``body`` (its 400 message), or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            return f"{key}: Field required"
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    breakpoints = 0
    system = body.get("system")
    if isinstance(system, list):
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                return f"system.{i}: Input should be a text block"
            extra = set(block) - _BLOCK_KEYS["text"]
            if extra:
                return f"system.{i}.{sorted(extra)[0]}: Extra inputs are not permitted"
            breakpoints += "cache_control" in block
    for i, tool in enumerate(body.get("tools") or []):
        extra = set(tool) - _TOOL_KEYS
        if extra:
            return f"tools.{i}.{sorted(extra)[0]}: Extra inputs are not permitted"
        if not _TOOL_NAME.match(str(tool.get("name", ""))):
            return f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{i}.custom.input_schema.type: Input should be 'object'"
        breakpoints += "cache_control" in tool
    pending: set[str] = set()  # tool_use ids the next message must answer
    for i, message in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != want:
            return (f"messages.{i}.role: messages must alternate between user and assistant, "
                    f"starting with user (expected {want!r})")
        blocks = _content_blocks(message)
        answered: set[str] = set()
        uses: set[str] = set()
        for j, block in enumerate(blocks):
            if not isinstance(block, dict) or block.get("type") not in _BLOCK_KEYS:
                return f"messages.{i}.content.{j}.type: unknown content block type"
            kind = block["type"]
            extra = set(block) - _BLOCK_KEYS[kind]
            if extra:
                return f"messages.{i}.content.{j}.{kind}.{sorted(extra)[0]}: Extra inputs are not permitted"
            breakpoints += "cache_control" in block
            if kind == "tool_result":
                if message["role"] != "user":
                    return f"messages.{i}.content.{j}: tool_result blocks belong to user messages"
                if block.get("tool_use_id") not in pending:
                    return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                            f"`tool_result` blocks: {block.get('tool_use_id')}. Each `tool_result` "
                            "block must have a corresponding `tool_use` block in the previous message.")
                answered.add(block["tool_use_id"])
            elif kind == "tool_use":
                if message["role"] != "assistant":
                    return f"messages.{i}.content.{j}: tool_use blocks belong to assistant messages"
                if not isinstance(block.get("input"), dict):
                    return f"messages.{i}.content.{j}.tool_use.input: Input should be a valid dictionary"
                uses.add(str(block.get("id")))
        missing = pending - answered
        if missing:
            return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {', '.join(sorted(missing))}. Each `tool_use` block must "
                    "have a corresponding `tool_result` block in the next message.")
        pending = uses
    if messages[-1].get("role") != "user":
        return "messages: the last message must be a user message (no prefill with tools here)"
    if breakpoints > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {breakpoints}."
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read ``requests`` instead

    # -- plumbing ----------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("request-id", f"req_test_{next(_ids):06d}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, kind: str, message: str,
               headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"type": "error", "error": {"type": kind, "message": message}},
                        headers)

    def _event(self, name: str, data: dict[str, Any]) -> None:
        chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.flush()

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", f"req_test_{next(_ids):06d}")
        self.end_headers()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- requests ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._error(404, "not_found_error", f"Not found: {self.path}")

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        record = Recorded(self.command, self.path,
                          {k.lower(): v for k, v in self.headers.items()}, body)
        record.streamed = isinstance(body, dict) and body.get("stream") is True
        with state.lock:
            state.requests.append(record)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client went away
            self._answer(record, state)

    def _answer(self, record: Recorded, state: _State) -> None:
        if self.path.split("?")[0].rstrip("/") != "/v1/messages":
            record.answered = "404"
            self._error(404, "not_found_error", f"Not found: {self.path}")
            return
        if state.api_key is not None and record.api_key != state.api_key:
            record.answered = "401"
            self._error(401, "authentication_error", "invalid x-api-key")
            return
        if state.strict:
            problem = validate(record.body)
            if problem is not None:
                record.answered = f"invalid: {problem}"
                self._error(400, "invalid_request_error", problem)
                return
        with state.lock:
            behaviour = state.script.popleft() if state.script else None
        if behaviour is None:
            record.answered = "unscripted"
            self._error(500, "api_error", "the test server has no scripted answer left",
                        {"x-should-retry": "false"})
            return
        if isinstance(behaviour, Hold):
            record.answered = "Hold"
            state.holding.set()
            state.released.wait(behaviour.seconds)
            self.close_connection = True
            return
        if isinstance(behaviour, Fail):
            record.answered = f"Fail {behaviour.status}"
            headers = dict(behaviour.headers)
            if behaviour.retry_after_ms is not None:
                headers.setdefault("retry-after-ms", str(behaviour.retry_after_ms))
            self._error(behaviour.status, behaviour.kind, behaviour.message, headers)
            return
        model = record.body["model"]
        if isinstance(behaviour, StreamError):
            record.answered = "StreamError"
            if not record.streamed:
                self._error(500, "api_error", "StreamError scripted for a request that does not stream")
                return
            self._start_stream()
            self._event("message_start", {"type": "message_start", "message": self._message(
                model, [], None, Tokens(output_tokens=1))})
            self._event("error", {"type": "error", "error": {"type": behaviour.error_type,
                                                              "message": behaviour.message}})
            self._end_stream()
            return
        record.answered = "Reply"
        content = self._content(behaviour)
        stop = behaviour.stop_reason or ("tool_use" if behaviour.tool_uses else "end_turn")
        if record.streamed:
            self._stream(behaviour.model or model, content, stop, behaviour.usage)
        else:
            self._send_json(200, self._message(behaviour.model or model, content, stop,
                                               behaviour.usage))

    @staticmethod
    def _content(reply: Reply) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        for use in reply.tool_uses:
            content.append({"type": "tool_use", "id": use.id or f"toolu_test_{next(_ids):06d}",
                            "name": use.name, "input": use.input})
        return content

    @staticmethod
    def _message(model: str, content: list[dict[str, Any]], stop: str | None,
                 usage: Tokens) -> dict[str, Any]:
        return {"id": f"msg_test_{next(_ids):06d}", "type": "message", "role": "assistant",
                "model": model, "content": content, "stop_reason": stop,
                "stop_sequence": None, "usage": usage.as_dict()}

    def _stream(self, model: str, content: list[dict[str, Any]], stop: str,
                usage: Tokens) -> None:
        self._start_stream()
        # message_start carries the input side of the usage and a provisional output count;
        # message_delta the final output count (the SDK overwrites, it does not add)
        self._event("message_start", {"type": "message_start", "message": self._message(
            model, [], None, Tokens(usage.input_tokens, 1, usage.cache_creation_input_tokens,
                                    usage.cache_read_input_tokens))})
        for index, block in enumerate(content):
            if block["type"] == "text":
                self._event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {"type": "text", "text": ""}})
                if index == 0:
                    self._event("ping", {"type": "ping"})
                for piece in _pieces(block["text"]):
                    self._event("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": piece}})
            else:
                self._event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {**block, "input": {}}})
                for piece in ["", *_pieces(json.dumps(block["input"]))]:
                    self._event("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece}})
            self._event("content_block_stop", {"type": "content_block_stop", "index": index})
        self._event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": usage.output_tokens}})
        self._event("message_stop", {"type": "message_stop"})
        self._end_stream()


def _pieces(text: str, size: int = 7) -> list[str]:
    """``text`` in small chunks, as the API streams it (split anywhere, even mid-token)."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class MessagesServer:
    """The server on an ephemeral port of 127.0.0.1, in a background thread.

    ``url`` is the base URL a client is configured with (``http://127.0.0.1:PORT``). Use as
    a context manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(self, *, api_key: str | None = None, strict: bool = True) -> None:
        self.state = _State(api_key=api_key, strict=strict)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the server is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[Recorded]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def unused(self) -> int:
        """Scripted behaviours not consumed yet."""
        with self.state.lock:
            return len(self.state.script)

    @property
    def holding(self) -> bool:
        """A request is held (:class:`Hold`), until :meth:`release`."""
        return self.state.holding.is_set()

    def release(self) -> None:
        """End every hold: their connections are closed unanswered."""
        self.state.released.set()

    def script(self, *behaviours: Behaviour) -> None:
        """Queue answers for the next requests, in order."""
        with self.state.lock:
            self.state.script.extend(behaviours)

    def reset(self) -> None:
        """Forget recorded requests and any unused script."""
        with self.state.lock:
            self.state.requests.clear()
            self.state.script.clear()

    def start(self) -> MessagesServer:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.state = self.state
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="messages-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> MessagesServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(monkeypatch: Any, api_key: str) -> Iterator[MessagesServer]:
    """A :class:`MessagesServer` that the SDK in this process (and the engines it starts)
    reaches: ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL`` set by ``monkeypatch`` (a
    pytest MonkeyPatch), the variables that would add other credentials unset."""
    for name in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    with MessagesServer(api_key=api_key) as s:
        monkeypatch.setenv("ANTHROPIC_API_KEY", api_key)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
        yield s

"""A local embeddings server for the tests: speaks the OpenAI embeddings API and Voyage's.

``POST /v1/embeddings`` with ``{"model": ..., "input": [...]}`` (Voyage also sends
``"input_type"``) answers ``{"object": "list", "data": [{"object": "embedding", "index": i,
"embedding": [...]}], "model": ..., "usage": {...}}``. The vectors are deterministic: the
:class:`~animus_core.faculties.embedders.HashingEmbedder` of each input, so a test can compute what a
stored memory's embedding must be.

Every request is recorded (path, headers, JSON body). Behaviour is scripted per request:
:meth:`EmbeddingServer.script` queues answers that the next requests consume in order (an
HTTP error with a body, garbage, the wrong number of vectors, vectors of another dimension,
a hang), and when the script is empty the server answers normally.

The real client code (``OpenAIEmbedder``, ``VoyageEmbedder`` over urllib in a thread) talks
to it over a real socket::

    with EmbeddingServer(dimension=64) as server:
        embedder = OpenAIEmbedder(url=server.url, model="m", key="k", dimension=None)
        server.script(Fail(500, "overloaded"), OK)
        ...
        assert server.requests[0].body["model"] == "m"
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from animus_core.faculties.embedders import HashingEmbedder

__all__ = [
    "OK",
    "EmbeddingServer",
    "Fail",
    "Garbage",
    "Hang",
    "Recorded",
    "Reply",
    "Truncated",
    "WrongCount",
    "WrongDimension",
]


@dataclass(frozen=True)
class Reply:
    """Answer normally (optionally with the items in reverse order: clients must use
    ``index``, not the position)."""

    reverse: bool = False


OK = Reply()


@dataclass(frozen=True)
class Fail:
    """An HTTP error status with a body (JSON ``{"error": {"message": ...}}`` by default)."""

    status: int
    message: str = "internal error"
    raw: bool = False  # send ``message`` as the body as it is, not wrapped in JSON


@dataclass(frozen=True)
class Garbage:
    """HTTP 200 with a body that is not an embeddings response."""

    body: bytes = b"<html><body>502 Bad Gateway (upstream is a teapot)</body></html>"
    content_type: str = "text/html"


@dataclass(frozen=True)
class WrongCount:
    """HTTP 200 with ``delta`` more (or, negative, fewer) vectors than inputs."""

    delta: int = -1


@dataclass(frozen=True)
class WrongDimension:
    """HTTP 200 with vectors of another dimension."""

    dimension: int


@dataclass(frozen=True)
class Hang:
    """Accept the request and answer nothing for ``seconds`` (or until the server stops)."""

    seconds: float = 30.0


@dataclass(frozen=True)
class Truncated:
    """HTTP 200 announcing a longer body than it sends, then closing the connection."""

    send: bytes = b'{"object": "list", "data": [{"ind'


Behaviour = Reply | Fail | Garbage | WrongCount | WrongDimension | Hang | Truncated


@dataclass
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the decoded JSON body (None if it was not JSON)
    answered: str = ""  # which behaviour answered it

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def inputs(self) -> list[str]:
        return list(self.body.get("input", [])) if isinstance(self.body, dict) else []


@dataclass
class _State:
    dimension: int
    script: deque[Behaviour] = field(default_factory=deque)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read ``requests`` instead

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(404, json.dumps({"error": {"message": "only POST /v1/embeddings"}}).encode())

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        record = Recorded(self.command, self.path,
                          {k.lower(): v for k, v in self.headers.items()}, body)
        with state.lock:
            state.requests.append(record)
            behaviour: Behaviour = state.script.popleft() if state.script else OK
        record.answered = type(behaviour).__name__
        # the client may have given up (a timeout): then there is nobody to answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer(behaviour, body, state)

    def _answer(self, behaviour: Behaviour, body: Any, state: _State) -> None:
        if isinstance(behaviour, Hang):
            state.stopping.wait(behaviour.seconds)
            self.close_connection = True
            return
        if isinstance(behaviour, Fail):
            payload = (behaviour.message.encode() if behaviour.raw else json.dumps(
                {"error": {"message": behaviour.message, "type": "server_error"}}).encode())
            self._send(behaviour.status, payload,
                       "text/plain" if behaviour.raw else "application/json")
            return
        if isinstance(behaviour, Garbage):
            self._send(200, behaviour.body, behaviour.content_type)
            return
        if isinstance(behaviour, Truncated):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(behaviour.send) + 1000))
            self.end_headers()
            self.wfile.write(behaviour.send)
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.rstrip("/") != "/v1/embeddings":
            self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
            return
        if not isinstance(body, dict) or not isinstance(body.get("input"), list) \
                or not all(isinstance(t, str) for t in body["input"]) or "model" not in body:
            self._send(400, json.dumps({"error": {
                "message": "body must be {\"model\": str, \"input\": [str, ...]}"}}).encode())
            return
        texts: list[str] = body["input"]
        dimension = (behaviour.dimension if isinstance(behaviour, WrongDimension)
                     else state.dimension)
        hashing = HashingEmbedder(dimension)
        data = [{"object": "embedding", "index": i, "embedding": hashing.embed_one(t)}
                for i, t in enumerate(texts)]
        if isinstance(behaviour, WrongCount):
            if behaviour.delta < 0:
                data = data[:behaviour.delta]
            else:
                extra = hashing.embed_one("an extra vector nobody asked for")
                data += [{"object": "embedding", "index": len(data) + j, "embedding": extra}
                         for j in range(behaviour.delta)]
        if isinstance(behaviour, Reply) and behaviour.reverse:
            data.reverse()
        answer = {"object": "list", "data": data, "model": body["model"],
                  "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                            "total_tokens": sum(len(t.split()) for t in texts)}}
        self._send(200, json.dumps(answer).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class EmbeddingServer:
    """The server on an ephemeral port of 127.0.0.1, in a background thread.

    ``url`` is the API base a client is configured with (``http://127.0.0.1:PORT/v1``).
    Use as a context manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(self, dimension: int = 64) -> None:
        self.state = _State(dimension=dimension)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the server is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def requests(self) -> list[Recorded]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def dimension(self) -> int:
        return self.state.dimension

    def expected(self, text: str) -> list[float]:
        """The vector this server answers for ``text``."""
        return HashingEmbedder(self.state.dimension).embed_one(text)

    def script(self, *behaviours: Behaviour) -> None:
        """Queue answers for the next requests, in order; then answer normally again."""
        with self.state.lock:
            self.state.script.extend(behaviours)

    def reset(self) -> None:
        """Forget recorded requests and any unused script."""
        with self.state.lock:
            self.state.requests.clear()
            self.state.script.clear()

    def start(self) -> EmbeddingServer:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.state = self.state
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="embedding-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()  # releases hanging handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> EmbeddingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

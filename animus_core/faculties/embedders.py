"""Embedders: turn text into vectors. Built-ins are registered through the same
``register_embedders`` hook as third-party ones.

* ``hashing`` (default): a feature-hashing lexical embedder (words and character trigrams
  hashed into a fixed number of signed buckets). No network, no model download: the
  embedded install works out of the box. It captures shared words and spellings, not meaning.
* ``openai``: any server speaking the OpenAI embeddings API (``POST {url}/embeddings``):
  hosted APIs, or local servers such as Ollama, TEI or vLLM in air-gapped sites.
* ``voyage``: Voyage AI's embeddings API.
* ``sentence-transformers``: a sentence-transformers model already on disk
  (``pip install 'animus-substrate[local]'``).

HTTP embedders send batches, retry with backoff on 429, 5xx and connection errors, time
out, and report the server's own error text.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import pluggy

from animus_core.faculties.contract import hookimpl
from animus_core.infra.config import Settings
from animus_core.store.memory import Embedder, Kind
from animus_core.values.errors import ConfigError, EmbedderError

__all__ = [
    "Embedder",
    "HashingEmbedder",
    "OpenAIEmbedder",
    "SentenceTransformersEmbedder",
    "VoyageEmbedder",
    "register_embedders",
    "select_embedder",
]

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Signed feature hashing of words (weight 1) and character trigrams (weight 0.5),
    log-scaled term frequency, L2-normalized."""

    def __init__(self, dimension: int = 384) -> None:
        if not 8 <= dimension <= 2000:
            raise ConfigError(f"hashing embedder dimension must be 8-2000, got {dimension}")
        self.dimension = dimension
        self.name = f"hashing-v1-{dimension}"

    def embed_one(self, text: str) -> list[float]:
        counts: dict[int, float] = {}
        for word in _WORD.findall(text.lower()):
            features = [(word, 1.0)]
            padded = f"<{word}>"
            features += [(padded[i:i + 3], 0.5) for i in range(len(padded) - 2)]
            for feature, weight in features:
                h = zlib.crc32(feature.encode())
                sign = 1.0 if h & 0x80000000 else -1.0
                idx = h % self.dimension
                counts[idx] = counts.get(idx, 0.0) + sign * weight
        vec = [0.0] * self.dimension
        for idx, c in counts.items():
            vec[idx] = math.copysign(math.log1p(abs(c)), c)
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    async def embed(self, texts: Sequence[str], *, kind: Kind = "document") -> list[list[float]]:
        if len(texts) > 64:
            return await asyncio.to_thread(lambda: [self.embed_one(t) for t in texts])
        return [self.embed_one(t) for t in texts]


class _HttpEmbedder:
    kind_name = "http"

    def __init__(self, *, url: str, model: str, key: str | None, dimension: int | None,
                 batch_size: int = 96, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self._key = key
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.dimension = dimension or 0
        self.name = f"{self.kind_name}:{model}"

    def _payload(self, texts: Sequence[str], kind: Kind) -> dict[str, Any]:
        return {"model": self.model, "input": list(texts)}

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(f"{self.url}/embeddings", data=body, headers=headers,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data: bytes = resp.read()
            return data

    async def _request(self, texts: Sequence[str], kind: Kind) -> list[list[float]]:
        body = json.dumps(self._payload(texts, kind)).encode()
        where = f"embedder {self.name} at {self.url}"
        for attempt in range(self.retries + 1):
            try:
                raw = await asyncio.to_thread(self._post, body)
                break
            except urllib.error.HTTPError as e:
                text = e.read(2000).decode(errors="replace").strip()
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    await asyncio.sleep(self.backoff * 2 ** attempt)
                    continue
                raise EmbedderError(f"{where} returned HTTP {e.code}: {text or e.reason}") from None
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff * 2 ** attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise EmbedderError(f"{where} is unreachable: {reason}") from None
        try:
            data = json.loads(raw)["data"]
            vectors = [item["embedding"] for item in sorted(data, key=lambda d: d.get("index", 0))]
            if len(vectors) != len(texts) or not all(
                    isinstance(v, list) and v and all(isinstance(x, int | float) for x in v)
                    for v in vectors):
                raise ValueError("wrong shape")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EmbedderError(
                f"{where} returned something that is not {len(texts)} embeddings: {e}: "
                f"{raw[:200]!r}") from None
        return [[float(x) for x in v] for v in vectors]

    async def embed(self, texts: Sequence[str], *, kind: Kind = "document") -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            out += await self._request(texts[i:i + self.batch_size], kind)
        if out and not self.dimension:
            self.dimension = len(out[0])
        wrong = [len(v) for v in out if len(v) != self.dimension]
        if wrong:
            raise EmbedderError(
                f"embedder {self.name} at {self.url} returned vectors of {wrong[0]} dimensions, "
                f"expected {self.dimension}")
        return out

    async def probe(self) -> None:
        """Learn the dimension from the server when configuration did not give it."""
        if not self.dimension:
            await self.embed(["dimension probe"])


class OpenAIEmbedder(_HttpEmbedder):
    kind_name = "openai"


class VoyageEmbedder(_HttpEmbedder):
    kind_name = "voyage"

    def _payload(self, texts: Sequence[str], kind: Kind) -> dict[str, Any]:
        return {"model": self.model, "input": list(texts), "input_type": kind}


class SentenceTransformersEmbedder:
    """A sentence-transformers model loaded from a local path (no hub downloads)."""

    def __init__(self, model_path: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "ANIMUS_EMBEDDER=sentence-transformers needs the optional extra: "
                "pip install 'animus-substrate[local]'") from None
        self._model = SentenceTransformer(model_path, local_files_only=True)
        self.dimension = int(self._model.get_sentence_embedding_dimension())
        self.name = f"sentence-transformers:{model_path}"

    async def embed(self, texts: Sequence[str], *, kind: Kind = "document") -> list[list[float]]:
        vectors = await asyncio.to_thread(self._model.encode, list(texts),
                                          normalize_embeddings=True)
        return [list(map(float, v)) for v in vectors]


@hookimpl
def register_embedders(register: Callable[[str, Callable[[Settings], Embedder]], None]) -> None:
    register("hashing", lambda s: HashingEmbedder(s.embedder_dimensions or 384))

    def openai(s: Settings) -> Embedder:
        if not s.embedder_url:
            raise ConfigError("ANIMUS_EMBEDDER=openai needs ANIMUS_EMBEDDER_URL "
                              "(for example https://api.openai.com/v1 or http://localhost:11434/v1)")
        return OpenAIEmbedder(url=s.embedder_url, model=s.embedder_model or "text-embedding-3-small",
                              key=s.embedder_key, dimension=s.embedder_dimensions)

    def voyage(s: Settings) -> Embedder:
        return VoyageEmbedder(url=s.embedder_url or "https://api.voyageai.com/v1",
                              model=s.embedder_model or "voyage-3.5", key=s.embedder_key,
                              dimension=s.embedder_dimensions)

    def local(s: Settings) -> Embedder:
        if not s.embedder_model:
            raise ConfigError("ANIMUS_EMBEDDER=sentence-transformers needs ANIMUS_EMBEDDER_MODEL, "
                              "the path of a model on disk")
        return SentenceTransformersEmbedder(s.embedder_model)

    register("openai", openai)
    register("voyage", voyage)
    register("sentence-transformers", local)


def select_embedder(pm: pluggy.PluginManager, settings: Settings) -> Embedder:
    """The embedder ``settings.embedder`` names, from every plugin's ``register_embedders``."""
    factories: dict[str, Callable[[Settings], Embedder]] = {}

    def register(name: str, factory: Callable[[Settings], Embedder]) -> None:
        if name in factories:
            raise ConfigError(f"embedder name {name!r} is registered twice")
        factories[name] = factory

    pm.hook.register_embedders(register=register)
    factory = factories.get(settings.embedder)
    if factory is None:
        raise ConfigError(f"ANIMUS_EMBEDDER={settings.embedder!r} is not a known embedder; "
                          f"known: {', '.join(sorted(factories))}")
    return factory(settings)

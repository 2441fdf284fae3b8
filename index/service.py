"""psdclip serve: an ASGI service (FastAPI + uvicorn) over one or more indices; model and index load once.

    POST /search          our JSON: {"text" | "image" (base64) | "image_url" | "embedding", "k", "modality", ...}
    POST /knn-service     clip-retrieval's back-end request and response (its ClipClient and front end work)
    GET  /indices-list    clip-retrieval: the index names
    POST /metadata        clip-retrieval: metadata of ids
    GET  /images/{key}    the stored image, read from its shard by offset
    GET  /healthz         liveness and the loaded indices
    GET  /metrics         Prometheus
    POST /admin/reload    reload a rebuilt index without dropping a request (X-API-Key when one is set)
    GET  /                a web page: search by text or by an uploaded image

Bounds: k, body size, text length and image pixels (decompression bombs) are limited; a malformed request
gets a 4xx; `image_url` is refused unless the operator lists allowed hosts; keys are looked up, never used
as paths.
"""
# no "from __future__ import annotations": FastAPI reads the routes' annotations at run time

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import signal
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Optional

import numpy as np
import orjson
from fastapi import FastAPI, Header, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, \
    multiprocess
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from psdclip.pipeline.dataset import write_json
from psdclip.pipeline.errors import InputError, PsdclipError

from .config import ServeConfig

log = logging.getLogger(__name__)
LARGE_IMAGE_PIXELS = 4_000_000  # images above this are decoded in one of LARGE_DECODES slots
LARGE_DECODES = 2
FETCH_SLOTS = 8  # image_url fetches at once
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
RUN_DIR = "PSDCLIP_SERVE_RUNDIR"  # set by `psdclip serve --workers N` for its worker processes


class Workers:
    """How the processes of `psdclip serve --workers N` agree on reloads, through a run folder they share:
    generations.json (index name -> reload generation; a worker that reloads bumps it under a file lock) and
    acks/PID.json (the generations each live worker has loaded). Every worker polls generations.json and reloads
    an index whose generation moved; the worker that took /admin/reload answers once every worker has it."""

    def __init__(self, folder: str, count: int):
        self.folder, self.count = folder, count
        self.acks = os.path.join(folder, "acks")
        os.makedirs(self.acks, exist_ok=True)
        self.seen = self.generations()
        self.ack()

    def generations(self) -> dict:
        try:
            with open(os.path.join(self.folder, "generations.json"), encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def ack(self) -> None:
        write_json(os.path.join(self.acks, f"{os.getpid()}.json"), self.seen, indent=0)

    def bump(self, name: str) -> int:
        """A new generation of `name` (this worker has loaded it)."""
        import fcntl

        with open(os.path.join(self.folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            gens = self.generations()
            gens[name] = int(gens.get(name, 0)) + 1
            write_json(os.path.join(self.folder, "generations.json"), gens, indent=0)
        self.seen[name] = gens[name]
        self.ack()
        return gens[name]

    def moved(self) -> dict:
        """name -> generation, for the indices another worker reloaded since this one last looked."""
        return {n: g for n, g in self.generations().items() if g > self.seen.get(n, 0)}

    def loaded(self, name: str, gen: int) -> int:
        """How many live workers have loaded generation `gen` of `name` (or a later one)."""
        n = 0
        for entry in os.listdir(self.acks):
            pid = entry[:-len(".json")]
            if not entry.endswith(".json") or not pid.isdigit():  # (not a file being written)
                continue
            try:
                os.kill(int(pid), 0)
                with open(os.path.join(self.acks, entry), encoding="utf-8") as f:
                    n += int(json.load(f).get(name, 0)) >= gen
            except (OSError, ValueError):
                continue
        return n

    def wait(self, name: str, gen: int, timeout: float = 300.0) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.loaded(name, gen)) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        return n


class _Query(NamedTuple):
    future: Any
    searcher: Any
    k: int
    modality: str
    dedupe: bool
    text: Optional[str]
    image: Any
    embedding: Optional[list]


class Batcher:
    """Answers concurrent queries together: requests queue while a batch runs, and the next batch encodes all
    waiting texts in one forward pass and searches all waiting vectors in one index call, on one worker thread
    (the model is not shared between threads). An idle service answers a lone query at once; no waiting."""

    def __init__(self, max_batch: int = 64, sizes=None, threads: int = 0):
        self.max_batch, self.sizes = max_batch, sizes
        self.pending: list[_Query] = []
        self.running = False
        # OpenMP's thread count is per calling thread: faiss's (and its BLAS') is set in the thread that searches
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="psdclip-query", initializer=_set_threads,
                                           initargs=(threads,))

    async def search(self, searcher, k, modality, dedupe, text=None, image=None, embedding=None) -> list[dict]:
        loop = asyncio.get_running_loop()
        query = _Query(loop.create_future(), searcher, k, modality, dedupe, text, image, embedding)
        self.pending.append(query)
        if not self.running:
            self.running = True
            loop.create_task(self._drain(loop))
        return await query.future

    async def _drain(self, loop):
        try:
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                if self.sizes is not None:
                    self.sizes.observe(len(batch))
                outcomes = await loop.run_in_executor(self.executor, self._answer, batch)
                for q, outcome in zip(batch, outcomes):
                    if not q.future.done():
                        (q.future.set_exception if isinstance(outcome, Exception) else q.future.set_result)(outcome)
        finally:
            self.running = False

    @staticmethod
    def _answer(batch: list[_Query]) -> list:
        """One result list or one exception per query; a bad query does not fail the others."""
        out: list = [None] * len(batch)
        vectors: dict = {}
        groups: dict = {}
        for j, q in enumerate(batch):
            groups.setdefault(id(q.searcher), (q.searcher, []))[1].append(j)
        for s, members in groups.values():
            texts = [j for j in members if batch[j].text is not None]
            images = [j for j in members if batch[j].image is not None]
            try:
                if texts:
                    vectors.update(zip(texts, s.embed_text([batch[j].text for j in texts])))
                if images:
                    vectors.update(zip(images, s.embed_images([batch[j].image for j in images])))
            except Exception as err:  # pylint: disable=broad-except
                for j in texts + images:
                    out[j] = err
            for j in members:
                if batch[j].embedding is not None:
                    try:
                        vectors[j] = s.check_embedding(batch[j].embedding)[0]
                    except ValueError as err:
                        out[j] = err
            by_modality: dict = {}
            for j in members:
                if out[j] is None:
                    by_modality.setdefault(batch[j].modality, []).append(j)
            for modality, js in by_modality.items():
                try:
                    results = s.search_vectors(np.stack([vectors[j] for j in js]), [batch[j].k for j in js], modality,
                                               [batch[j].dedupe for j in js])
                    for j, r in zip(js, results):
                        out[j] = r
                except Exception as err:  # pylint: disable=broad-except
                    for j in js:
                        out[j] = err
        return out


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI middleware (no per-request task or body buffering, unlike @app.middleware): bounds the body,
    declared or streamed; lets clip-retrieval's ClipClient in (it posts JSON without a Content-Type, which its
    Flask back end accepts); counts requests and latency per route for /metrics; turns a crash into a 500.

    The query routes (`queries`: path -> (request model, async answer function)) are answered here, straight
    from the ASGI call: pydantic-core validates the body from its bytes and orjson writes the answer, without
    FastAPI's routing, dependency solving and response classes (at 32 clients those took about half of the event
    loop's time per query). FastAPI still declares the same routes, for the OpenAPI schema and /docs, and they
    answer alike (same models, same answer functions); errors keep FastAPI's shape ({"detail": ...}, 422 with
    pydantic's errors located in "body")."""

    JSON_WITHOUT_TYPE = {"/knn-service", "/metadata", "/search"}

    def __init__(self, app, max_body: int, requests, latency, queries=None):
        self.app, self.max_body, self.requests, self.latency = app, max_body, requests, latency
        self.queries = queries or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t = time.perf_counter()
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        state = {"status": 500, "started": False, "received": 0}
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._reply(send, 413, f"request body over {self.max_body} bytes", state)
            return self._count(scope, state, t)
        if scope["method"] == "POST" and b"content-type" not in headers and scope["path"] in self.JSON_WITHOUT_TYPE:
            scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]

        async def bounded_receive():
            message = await receive()
            state["received"] += len(message.get("body", b""))
            if state["received"] > self.max_body:
                raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            query = self.queries.get(scope["path"]) if scope["method"] == "POST" else None
            if query is not None:
                state["endpoint"] = scope["path"]
                if not await self._query(query, headers, bounded_receive, tracking_send):
                    state["status"] = 499  # the client went away before its body arrived: counted, not a 500
            else:
                await self.app(scope, bounded_receive, tracking_send)
        except _BodyTooLarge:
            if not state["started"]:
                await self._reply(send, 413, f"request body over {self.max_body} bytes", state)
        except Exception:  # pylint: disable=broad-except  (a crash is a 500 with no traceback to the client)
            log.exception("500 on %s %s", scope.get("method"), scope.get("path"))  # ... but one in the log
            if not state["started"]:
                await self._reply(send, 500, "internal error", state)
        self._count(scope, state, t)

    @staticmethod
    async def _query(query, headers, receive, send) -> bool:
        """Answers one query request; False when the client disconnected before sending its whole body."""
        model, answer = query
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        kind = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        try:
            if kind != b"application/json" and not kind.endswith(b"+json"):
                raise HTTPException(422, f"the body must be JSON (Content-Type: application/json), not {kind.decode()}")
            try:
                req = model.model_validate_json(b"".join(chunks))
            except ValidationError as err:
                errors = [{**e, "loc": ["body", *e["loc"]]} for e in err.errors(include_url=False)]
                raise HTTPException(422, errors) from None
            status, content = 200, await answer(req)
        except HTTPException as err:
            status, content = err.status_code, {"detail": err.detail}
        try:
            body = orjson.dumps(content, default=str)
        except TypeError:  # what orjson refuses and json writes: a validation error echoing an integer beyond
            body = json.dumps(content, default=str).encode()  # 64 bits, or a string with a lone surrogate
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return True

    @staticmethod
    async def _reply(send, status, detail, state):
        body = json.dumps({"detail": detail}).encode()
        state["status"], state["started"] = status, True
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _count(self, scope, state, t):
        endpoint = state.get("endpoint") or getattr(scope.get("route"), "path", "other")
        self.requests.labels(endpoint, str(state["status"])).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - t)


# ---- requests ----------------------------------------------------------------------------------------
# The bounds below are the defaults; `bounded_models(cfg)` derives the service's own, so that its OpenAPI schema
# states the operator's limits (--max-k, --max-text-chars).

class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Optional[str] = Field(None, max_length=1000)
    image: Optional[str] = Field(None, description="base64-encoded image")
    image_url: Optional[str] = None
    embedding: Optional[list[float]] = Field(None, max_length=8192)
    k: int = Field(10, ge=1, le=1000)
    modality: str = Field("image", pattern="^(image|text)$")
    index: Optional[str] = None
    dedupe: bool = False


class KnnRequest(BaseModel):
    """clip-retrieval's back-end request."""
    model_config = ConfigDict(extra="allow")
    text: Optional[str] = Field(None, max_length=1000)
    image: Optional[str] = None
    image_url: Optional[str] = None
    embedding_input: Optional[list[float]] = Field(None, max_length=8192)
    modality: str = Field("image", pattern="^(image|text)$")
    num_images: int = Field(..., ge=1, le=1000)
    num_result_ids: Optional[int] = Field(None, ge=1, le=10000)
    indice_name: Optional[str] = None
    deduplicate: bool = False


class MetadataRequest(BaseModel):
    ids: list[int] = Field(..., max_length=1000)
    indice_name: Optional[str] = None


def bounded_models(cfg: ServeConfig) -> tuple[type, type, type]:
    """(SearchRequest, KnnRequest, MetadataRequest) with this service's limits."""
    text = (Optional[str], Field(None, max_length=cfg.max_text_chars))
    return (create_model("SearchRequest", __base__=SearchRequest, text=text, k=(int, Field(10, ge=1, le=cfg.max_k))),
            create_model("KnnRequest", __base__=KnnRequest, text=text, num_images=(int, Field(..., ge=1, le=cfg.max_k)),
                         num_result_ids=(Optional[int], Field(None, ge=1, le=cfg.max_k * 10))),
            create_model("MetadataRequest", __base__=MetadataRequest, ids=(list[int], Field(..., max_length=cfg.max_k))))


# ---- the service ---------------------------------------------------------------------------------------

class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Every redirect hop is checked against the allow-list like the first URL (no SSRF through a redirect)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.allowed(newurl):
            raise HTTPException(403, "image_url redirects to a host that is not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RetrievalService:
    """What the routes call: the named searchers (and their reload), the query batcher, image decoding, image_url
    fetching and the metrics registry. Errors a client caused are HTTPExceptions."""

    def __init__(self, cfg: ServeConfig):
        from .searcher import Searcher

        self.cfg, self.Searcher = cfg, Searcher
        self.paths = cfg.named()
        _set_threads(cfg.threads)
        self.searchers = {name: Searcher(path, cfg.device, text_cache=cfg.text_cache, text_runtime=cfg.text_runtime)
                          for name, path in self.paths.items()}
        self.default = next(iter(self.searchers))
        self.lock = threading.Lock()
        self.api_key = cfg.api_key or os.environ.get("PSDCLIP_API_KEY", "")
        self.large_decodes = threading.BoundedSemaphore(LARGE_DECODES)
        self.fetch_slots = threading.BoundedSemaphore(FETCH_SLOTS)
        self.opener = urllib.request.build_opener(_CheckedRedirects(self.allowed))
        self.workers = Workers(os.environ[RUN_DIR], cfg.workers) if cfg.workers > 1 and RUN_DIR in os.environ else None
        self.registry = CollectorRegistry()
        # counts kept by each searcher (a reload starts a new one at 0): gauges set when /metrics is read (several
        # workers: prometheus_client's multiprocess files, summed over the live workers)
        self.cache_hits = Gauge("psdclip_text_cache_hits", "query texts answered from the embedding cache", ["index"],
                                registry=self.registry, multiprocess_mode="livesum")
        self.cache_misses = Gauge("psdclip_text_cache_misses", "query texts encoded by the model", ["index"],
                                  registry=self.registry, multiprocess_mode="livesum")
        self.requests = Counter("psdclip_requests_total", "requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("psdclip_request_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        sizes = Histogram("psdclip_query_batch_size", "queries answered together", registry=self.registry,
                          buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batcher = Batcher(threads=cfg.threads, sizes=sizes)

    # ---- indices ----
    def pick(self, name: Optional[str]):
        with self.lock:
            if name is None or name == "":
                return self.searchers[self.default]
            if name not in self.searchers:
                raise HTTPException(404, f"no index named {name!r} (have: {', '.join(self.searchers)})")
            return self.searchers[name]

    def health(self) -> dict:
        with self.lock:
            out = {"status": "ok", "indices": {n: {"count": s.info["count"], "factory": s.info["factory"]}
                                               for n, s in self.searchers.items()}}
        if self.workers:
            out["worker"] = {"pid": os.getpid(), "generations": dict(self.workers.seen)}
        return out

    def metrics(self) -> bytes:
        for name, s in self.searchers.items():
            self.cache_hits.labels(name).set(s.cache_hits)
            self.cache_misses.labels(name).set(s.cache_misses)
        if self.workers:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)

    async def follow_reloads(self) -> None:
        """Several workers: reload what another worker reloaded (polled every 0.2 s); leave when the parent process
        is gone (killed with SIGKILL, it cannot stop its workers itself)."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(0.2)
            if os.getppid() != parent:
                log.warning("worker %d: the serve process is gone; stopping", os.getpid())
                os._exit(0)
            for name, gen in self.workers.moved().items():
                try:
                    await run_in_threadpool(self._swap, name)
                    self.workers.seen[name] = gen
                    self.workers.ack()
                except Exception:  # pylint: disable=broad-except  (the old index stays; the reload reports fewer workers)
                    log.exception("worker %d: reload of %s failed", os.getpid(), name)
                    self.workers.seen[name] = gen

    def reload(self, name: Optional[str], key: Optional[str]) -> dict:
        """Load the index aside (requests keep using the old one meanwhile), then swap it in."""
        if not self.api_key:
            raise HTTPException(403, "admin endpoints are off (start the service with --api-key)")
        if key != self.api_key:
            raise HTTPException(401, "wrong or missing X-API-Key")
        name = name or self.default
        if name not in self.paths:
            raise HTTPException(404, f"no index named {name!r}")
        try:
            fresh = self._swap(name)
        except InputError as err:
            raise HTTPException(409, str(err)) from None
        except Exception as err:  # pylint: disable=broad-except  (a damaged file: the old index stays in service)
            log.exception("reload of %s failed", self.paths[name])
            raise HTTPException(409, f"could not load {name!r}: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:200] if str(err) else 'damaged index'}") from None
        out = {"reloaded": name, "count": fresh.info["count"]}
        if self.workers:  # the others follow; answer once every worker serves the new index
            out["workers"] = self.workers.wait(name, self.workers.bump(name))
            out["of_workers"] = self.workers.count
        return out

    def _swap(self, name: str):
        fresh = self.Searcher(self.paths[name], self.cfg.device, text_cache=self.cfg.text_cache,
                              model=self._same_model(name), text_runtime=self.cfg.text_runtime)
        with self.lock:
            self.searchers[name] = fresh
        return fresh

    def _same_model(self, name: str):
        """The loaded model of the index being reloaded when the rebuilt index names the same checkpoint file with
        the same contents: the reload then shares it instead of holding a second copy."""
        from psdclip.pipeline.dataset import read_json

        old = self.searchers[name]
        try:
            info = read_json(os.path.join(self.paths[name], "index.json"))
        except (OSError, InputError):
            return None
        same = info.get("checkpoint") == old.info.get("checkpoint") and \
            info.get("checkpoint_sha256") == old.info.get("checkpoint_sha256")
        return old.loaded if same else None

    # ---- query images ----
    def decode_image(self, data: bytes):
        """Decoded and shrunk to at most 1024 px a side (the model sees far fewer): a large image is decoded in one
        of a few slots only, so that concurrent large images cannot take the memory of all of them at once."""
        limit = self.cfg.max_image_pixels
        Image.MAX_IMAGE_PIXELS = limit
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > limit:
                    raise HTTPException(413, f"image over {limit} pixels")
                big = im.width * im.height > LARGE_IMAGE_PIXELS
                if big and not self.large_decodes.acquire(timeout=30):
                    raise HTTPException(503, "too many large images being decoded; try again")
                try:
                    im.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale directly
                    im.load()
                    im.thumbnail((1024, 1024))
                    return im.convert("RGB")
                finally:
                    if big:
                        self.large_decodes.release()
        except HTTPException:
            raise
        except Image.DecompressionBombError:
            raise HTTPException(413, f"image over {limit} pixels") from None
        except Exception:  # pylint: disable=broad-except
            raise HTTPException(400, "image is not a decodable image") from None

    def from_base64(self, text: str):
        try:
            return self.decode_image(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image must be base64") from None

    def allowed(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and parts.hostname in set(self.cfg.allowed_url_hosts)

    def fetch_url(self, url: str):
        """Off the event loop, at most FETCH_SLOTS at once (more get 503 at once, so slow hosts cannot hold every
        worker thread), within --fetch-timeout in all; errors say nothing of the network behind the host."""
        cfg = self.cfg
        if not self.allowed(url):
            raise HTTPException(403, "image_url queries are not allowed for this host (operator: --allowed-url-hosts)")
        if not self.fetch_slots.acquire(blocking=False):
            raise HTTPException(503, "too many image_url fetches in flight; try again")
        try:
            deadline = time.monotonic() + cfg.fetch_timeout
            chunks, size = [], 0
            with self.opener.open(url, timeout=cfg.fetch_timeout) as r:
                while True:
                    if time.monotonic() > deadline:
                        raise HTTPException(504, f"image_url took longer than {cfg.fetch_timeout:g} s")
                    chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > cfg.max_body_bytes:
                        raise HTTPException(413, "image_url content too large")
                    chunks.append(chunk)
        except HTTPException:
            raise
        except (OSError, ValueError):
            raise HTTPException(502, "could not fetch image_url") from None
        finally:
            self.fetch_slots.release()
        return self.decode_image(b"".join(chunks))

    # ---- search ----
    async def search(self, index: Optional[str], text, image, image_url, embedding, k: int, modality: str,
                     dedupe: bool) -> list[dict]:
        """Exactly one of text, image (base64), image_url or embedding; answered in the batcher's next batch."""
        s = self.pick(index)
        given = [x is not None and x != "" for x in (text, image, image_url, embedding)]
        if sum(given) != 1:
            raise HTTPException(422, "give exactly one of text, image, image_url or embedding")
        img = None
        if image:
            img = await run_in_threadpool(self.from_base64, image)
        elif image_url:
            img = await run_in_threadpool(self.fetch_url, image_url)
        try:
            results = await self.batcher.search(s, k, modality, dedupe, text=text or None, image=img,
                                                embedding=embedding)
            if self.workers and text:  # several processes: /metrics is read by any one of them
                name = index or self.default
                self.cache_hits.labels(name).set(s.cache_hits)
                self.cache_misses.labels(name).set(s.cache_misses)
            return results
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    def metadata(self, ids: list[int], index: Optional[str]) -> list[dict]:
        return self.pick(index).metadata(ids)

    def image_bytes(self, key: str, index: Optional[str]) -> bytes:
        try:
            return self.pick(index).image_bytes(key)
        except KeyError:
            raise HTTPException(404, "no such image") from None


# ---- routes --------------------------------------------------------------------------------------------

def _json(content) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def create_app(cfg: ServeConfig):
    svc = RetrievalService(cfg)
    Search, Knn, Metadata = bounded_models(cfg)
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        follower = asyncio.create_task(svc.follow_reloads()) if svc.workers else None
        yield
        if follower:
            follower.cancel()

    async def answer_search(req) -> dict:
        t = time.perf_counter()
        results = await svc.search(req.index, req.text, req.image, req.image_url, req.embedding, req.k, req.modality,
                                   req.dedupe)
        return {"results": results, "took_ms": round(1000 * (time.perf_counter() - t), 2),
                "index": req.index or svc.default}

    async def answer_knn(req) -> list:
        results = await svc.search(req.indice_name, req.text, req.image, req.image_url, req.embedding_input,
                                   req.num_images, req.modality, req.deduplicate)
        return [{"url": r["url"], "caption": r["caption"], "id": r["id"], "similarity": r["score"], "key": r["key"]}
                for r in results]

    app = FastAPI(title="psdclip retrieval", version="1", lifespan=lifespan)
    app.state.service = svc
    app.add_middleware(_Guard, max_body=cfg.max_body_bytes, requests=svc.requests, latency=svc.latency,
                       queries={"/search": (Search, answer_search), "/knn-service": (Knn, answer_knn)})

    # the query routes are answered by _Guard; declared here for the OpenAPI schema (and they answer alike)
    @app.post("/search")
    async def search(req: Search):
        return _json(await answer_search(req))

    @app.post("/knn-service")
    async def knn_service(req: Knn):
        return _json(await answer_knn(req))

    @app.get("/indices-list")
    def indices_list():
        return list(svc.searchers)

    @app.post("/metadata")
    def metadata(req: Metadata):
        return svc.metadata(req.ids, req.indice_name)

    @app.get("/images/{key}")
    def image(key: str, index: Optional[str] = None):
        return Response(svc.image_bytes(key, index), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz")
    def healthz():
        return svc.health()

    @app.get("/metrics")
    def metrics():
        return Response(svc.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload(index: Optional[str] = None, x_api_key: Optional[str] = Header(None)):
        return svc.reload(index, x_api_key)

    @app.get("/")
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/favicon.ico")
    def favicon():
        return PlainTextResponse("", status_code=204)

    return app


def _set_threads(n: int) -> None:
    """n CPU threads for torch and faiss in this process (0: leave their defaults)."""
    if n:
        import faiss
        import torch

        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)


def _quiet_gc() -> None:
    gc.collect()
    gc.freeze()  # the loaded model, index metadata and app stay out of later collections: shorter GC pauses
    gc.set_threshold(50_000, 20, 100)  # requests make short-lived objects: collect young ones less often


FAILED = "failed.json"  # in the run folder: why a worker could not start


def worker_app():
    """The app of one `psdclip serve --workers N` process (uvicorn's factory; the config comes from the parent).
    A worker that cannot start (a checkpoint that does not load, no memory) records why in the run folder and
    stops the parent, which shuts the service down and reports it in one line: uvicorn would otherwise start
    the worker again and again."""
    cfg = ServeConfig(**json.loads(os.environ["PSDCLIP_SERVE_CONFIG"]))
    try:
        app = create_app(cfg)
    except Exception as err:  # pylint: disable=broad-except
        message = str(err) if isinstance(err, PsdclipError) else f"{type(err).__name__}: {err}"
        with contextlib.suppress(OSError):
            write_json(os.path.join(os.environ[RUN_DIR], FAILED),
                       {"message": message, "input": isinstance(err, InputError)})
        os.kill(os.getppid(), signal.SIGTERM)  # uvicorn's supervisor: it stops the other workers and returns
        raise SystemExit(3) from None
    _quiet_gc()
    return app


def cmd_serve(cfg: ServeConfig) -> int:
    import uvicorn

    if cfg.workers == 1:
        app = create_app(cfg)
        _quiet_gc()
        print(f"serving {', '.join(cfg.named())} on http://{cfg.host}:{cfg.port}", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
        return 0
    import shutil
    import socket
    import tempfile

    from .searcher import Searcher

    for path in cfg.named().values():  # a bad index or a missing checkpoint is one line here, not N workers failing
        ckpt = Searcher(path, cfg.device, load_model=False).info.get("checkpoint")
        if ckpt and not os.path.exists(ckpt):
            raise InputError(f"{path}: the model checkpoint its index.json names, {ckpt}, is missing (text and "
                             f"image queries need it: restore it, or rebuild the index)")
    if cfg.port == 0:
        with socket.socket() as sock:
            sock.bind((cfg.host, 0))
            cfg = dataclasses.replace(cfg, port=sock.getsockname()[1])
    run = tempfile.mkdtemp(prefix="psdclip-serve-")
    os.makedirs(os.path.join(run, "metrics"))
    os.environ.update({"PSDCLIP_SERVE_CONFIG": json.dumps(dataclasses.asdict(cfg)), RUN_DIR: run,
                       "PROMETHEUS_MULTIPROC_DIR": os.path.join(run, "metrics")})
    print(f"serving {', '.join(cfg.named())} on http://{cfg.host}:{cfg.port} ({cfg.workers} worker processes)",
          flush=True)
    try:
        uvicorn.run("psdclip.index.service:worker_app", factory=True, workers=cfg.workers, host=cfg.host,
                    port=cfg.port, log_level="warning", access_log=False)
        failed = os.path.join(run, FAILED)
        if os.path.isfile(failed):
            with open(failed, encoding="utf-8") as f:
                why = json.load(f)
            raise (InputError if why["input"] else PsdclipError)(f"a worker could not start: {why['message']}")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return 0

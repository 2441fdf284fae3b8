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
# no "from __future__ import annotations": FastAPI must see the request models defined in create_app

import asyncio
import base64
import binascii
import gc
import io
import json
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Optional

import numpy as np

from psdclip.pipeline.errors import InputError

from .config import ServeConfig

log = logging.getLogger("psdclip.index.service")
LARGE_IMAGE_PIXELS = 4_000_000  # images above this are decoded in one of LARGE_DECODES slots
LARGE_DECODES = 2
FETCH_SLOTS = 8  # image_url fetches at once
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


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

    def __init__(self, max_batch: int = 64, sizes=None):
        self.max_batch, self.sizes = max_batch, sizes
        self.pending: list[_Query] = []
        self.running = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="psdclip-query")

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
    Flask back end accepts); counts requests and latency per route for /metrics; turns a crash into a 500."""

    JSON_WITHOUT_TYPE = {"/knn-service", "/metadata", "/search"}

    def __init__(self, app, max_body: int, requests, latency):
        self.app, self.max_body, self.requests, self.latency = app, max_body, requests, latency

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
    async def _reply(send, status, detail, state):
        body = json.dumps({"detail": detail}).encode()
        state["status"], state["started"] = status, True
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _count(self, scope, state, t):
        endpoint = getattr(scope.get("route"), "path", "other")
        self.requests.labels(endpoint, str(state["status"])).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - t)


def create_app(cfg: ServeConfig):
    from fastapi import FastAPI, Header, HTTPException
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, PlainTextResponse, Response
    from PIL import Image
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field

    from .searcher import Searcher

    paths = cfg.named()
    large_decodes = threading.BoundedSemaphore(LARGE_DECODES)
    fetch_slots = threading.BoundedSemaphore(FETCH_SLOTS)
    searchers = {name: Searcher(path, cfg.device, text_cache=cfg.text_cache) for name, path in paths.items()}
    default = next(iter(searchers))
    lock = threading.Lock()
    api_key = cfg.api_key or os.environ.get("PSDCLIP_API_KEY", "")
    registry = CollectorRegistry()
    # counts kept by each searcher (a reload starts a new one at 0): gauges set when /metrics is read
    cache_hits = Gauge("psdclip_text_cache_hits", "query texts answered from the embedding cache", ["index"],
                       registry=registry)
    cache_misses = Gauge("psdclip_text_cache_misses", "query texts encoded by the model", ["index"], registry=registry)
    requests = Counter("psdclip_requests_total", "requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("psdclip_request_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
    app = FastAPI(title="psdclip retrieval", version="1")

    app.add_middleware(_Guard, max_body=cfg.max_body_bytes, requests=requests, latency=latency)

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: Optional[str] = Field(None, max_length=cfg.max_text_chars)
        image: Optional[str] = Field(None, description="base64-encoded image")
        image_url: Optional[str] = None
        embedding: Optional[list[float]] = Field(None, max_length=8192)
        k: int = Field(10, ge=1, le=cfg.max_k)
        modality: str = Field("image", pattern="^(image|text)$")
        index: Optional[str] = None
        dedupe: bool = False

    class KnnRequest(BaseModel):  # clip-retrieval's back-end request
        model_config = ConfigDict(extra="allow")
        text: Optional[str] = Field(None, max_length=cfg.max_text_chars)
        image: Optional[str] = None
        image_url: Optional[str] = None
        embedding_input: Optional[list[float]] = Field(None, max_length=8192)
        modality: str = Field("image", pattern="^(image|text)$")
        num_images: int = Field(..., ge=1, le=cfg.max_k)
        num_result_ids: Optional[int] = Field(None, ge=1, le=cfg.max_k * 10)
        indice_name: Optional[str] = None
        deduplicate: bool = False

    class MetadataRequest(BaseModel):
        ids: list[int] = Field(..., max_length=cfg.max_k)
        indice_name: Optional[str] = None

    def pick(name: Optional[str]) -> Searcher:
        with lock:
            if name is None or name == "":
                return searchers[default]
            if name not in searchers:
                raise HTTPException(404, f"no index named {name!r} (have: {', '.join(searchers)})")
            return searchers[name]

    def decode_image(data: bytes):
        """Decoded and shrunk to at most 1024 px a side (the model sees far fewer): a large image is decoded in one
        of a few slots only, so that concurrent large images cannot take the memory of all of them at once."""
        Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > cfg.max_image_pixels:
                    raise HTTPException(413, f"image over {cfg.max_image_pixels} pixels")
                big = im.width * im.height > LARGE_IMAGE_PIXELS
                if big and not large_decodes.acquire(timeout=30):
                    raise HTTPException(503, "too many large images being decoded; try again")
                try:
                    im.draft("RGB", (1024, 1024))  # JPEG: decode at a reduced scale directly
                    im.load()
                    im.thumbnail((1024, 1024))
                    return im.convert("RGB")
                finally:
                    if big:
                        large_decodes.release()
        except HTTPException:
            raise
        except Image.DecompressionBombError:
            raise HTTPException(413, f"image over {cfg.max_image_pixels} pixels") from None
        except Exception:  # pylint: disable=broad-except
            raise HTTPException(400, "image is not a decodable image") from None

    def from_base64(text: str):
        try:
            return decode_image(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image must be base64") from None

    def allowed(url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and parts.hostname in set(cfg.allowed_url_hosts)

    class CheckedRedirects(urllib.request.HTTPRedirectHandler):
        """Every redirect hop is checked against the allow-list like the first URL (no SSRF through a redirect)."""

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not allowed(newurl):
                raise HTTPException(403, "image_url redirects to a host that is not allowed")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(CheckedRedirects)

    def fetch_url(url: str):
        """Off the event loop, at most FETCH_SLOTS at once (more get 503 at once, so slow hosts cannot hold every
        worker thread), within --fetch-timeout in all; errors say nothing of the network behind the host."""
        if not allowed(url):
            raise HTTPException(403, "image_url queries are not allowed for this host (operator: --allowed-url-hosts)")
        if not fetch_slots.acquire(blocking=False):
            raise HTTPException(503, "too many image_url fetches in flight; try again")
        try:
            deadline = time.monotonic() + cfg.fetch_timeout
            chunks, size = [], 0
            with opener.open(url, timeout=cfg.fetch_timeout) as r:
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
            fetch_slots.release()
        return decode_image(b"".join(chunks))

    batcher = Batcher(sizes=Histogram("psdclip_query_batch_size", "queries answered together", registry=registry,
                                      buckets=(1, 2, 4, 8, 16, 32, 64)))

    async def run_search(s: Searcher, text, image, image_url, embedding, k, modality, dedupe):
        given = [x is not None and x != "" for x in (text, image, image_url, embedding)]
        if sum(given) != 1:
            raise HTTPException(422, "give exactly one of text, image, image_url or embedding")
        img = None
        if image:
            img = await run_in_threadpool(from_base64, image)
        elif image_url:
            img = await run_in_threadpool(fetch_url, image_url)
        try:
            return await batcher.search(s, k, modality, dedupe, text=text or None, image=img, embedding=embedding)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    def json_response(content) -> Response:
        return Response(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode(),
                        media_type="application/json")

    @app.post("/search")
    async def search(req: SearchRequest):
        t = time.perf_counter()
        s = pick(req.index)
        results = await run_search(s, req.text, req.image, req.image_url, req.embedding, req.k, req.modality,
                                   req.dedupe)
        return json_response({"results": results, "took_ms": round(1000 * (time.perf_counter() - t), 2),
                              "index": req.index or default})

    @app.post("/knn-service")
    async def knn_service(req: KnnRequest):
        s = pick(req.indice_name)
        results = await run_search(s, req.text, req.image, req.image_url, req.embedding_input,
                                   req.num_images, req.modality, req.deduplicate)
        return json_response([{"url": r["url"], "caption": r["caption"], "id": r["id"], "similarity": r["score"],
                               "key": r["key"]} for r in results])

    @app.get("/indices-list")
    def indices_list():
        return list(searchers)

    @app.post("/metadata")
    def metadata(req: MetadataRequest):
        s = pick(req.indice_name)
        c = s.columns
        return [{"id": i, "metadata": {"url": c["url"][i], "caption": c["caption"][i], "key": c["key"][i]}}
                for i in req.ids if 0 <= i < len(c["id"])]

    @app.get("/images/{key}")
    def image(key: str, index: Optional[str] = None):
        s = pick(index)
        try:
            data = s.image_bytes(key)
        except KeyError:
            raise HTTPException(404, "no such image") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz")
    def healthz():
        with lock:
            return {"status": "ok", "indices": {n: {"count": s.info["count"], "factory": s.info["factory"]}
                                                for n, s in searchers.items()}}

    @app.get("/metrics")
    def metrics():
        for name, s in searchers.items():
            cache_hits.labels(name).set(s.cache_hits)
            cache_misses.labels(name).set(s.cache_misses)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload(index: Optional[str] = None, x_api_key: Optional[str] = Header(None)):
        if not api_key:
            raise HTTPException(403, "admin endpoints are off (start the service with --api-key)")
        if x_api_key != api_key:
            raise HTTPException(401, "wrong or missing X-API-Key")
        name = index or default
        if name not in paths:
            raise HTTPException(404, f"no index named {name!r}")
        try:
            fresh = Searcher(paths[name], cfg.device, text_cache=cfg.text_cache)  # load aside; requests keep using the old one meanwhile
        except InputError as err:
            raise HTTPException(409, str(err)) from None
        except Exception as err:  # pylint: disable=broad-except  (a damaged file: the old index stays in service)
            log.exception("reload of %s failed", paths[name])
            raise HTTPException(409, f"could not load {name!r}: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:200] if str(err) else 'damaged index'}") from None
        with lock:
            searchers[name] = fresh
        return {"reloaded": name, "count": fresh.info["count"]}

    @app.get("/")
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/favicon.ico")
    def favicon():
        return PlainTextResponse("", status_code=204)

    return app


def cmd_serve(cfg: ServeConfig) -> int:
    import uvicorn

    app = create_app(cfg)
    gc.collect()
    gc.freeze()  # the loaded model, index metadata and app stay out of later collections: shorter GC pauses
    gc.set_threshold(50_000, 20, 100)  # requests make short-lived objects: collect young ones less often
    print(f"serving {', '.join(cfg.named())} on http://{cfg.host}:{cfg.port}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    return 0

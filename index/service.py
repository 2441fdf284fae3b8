"""psdclip serve: the app and its routes over one or more indices (FastAPI + uvicorn); model and index load once.

    POST /search          our JSON: {"text" | "image" (base64) | "image_url" | "embedding", "k", "modality", ...}
    POST /knn-service     clip-retrieval's back-end request and response (its ClipClient and front end work)
    GET  /indices-list    clip-retrieval: the index names
    POST /metadata        clip-retrieval: metadata of ids
    GET  /images/{key}    the stored image, read from its shard by offset
    GET  /healthz         liveness and the loaded indices
    GET  /metrics         Prometheus
    POST /admin/reload    reload a rebuilt index without dropping a request (X-API-Key when one is set)
    GET  /                a web page: search by text or by an uploaded image

Beside it: fastpath.py (the ASGI guard that answers the query routes, and the request models), batcher.py (queries
answered together), images.py (query images: decoding, image_url fetching), reload.py (reloads across worker
processes). Bounds: k, body size, text length and image pixels (decompression bombs) are limited; a malformed request
gets a 4xx; `image_url` is refused unless the operator lists allowed hosts; keys are looked up, never used as paths.
"""
# no "from __future__ import annotations": FastAPI reads the routes' annotations at run time

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Optional

import orjson
from fastapi import FastAPI, Header, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ..core.errors import InputError
from .batcher import Batcher, set_threads
from .config import ServeConfig
from .fastpath import NOT_APPLIED, Guard, bounded_models
from .format import IndexInfo
from .images import QueryImages
from .reload import RUN_DIR, Workers
from .searcher import DatasetChanged, Searcher

log = logging.getLogger(__name__)
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class RetrievalService:
    """What the routes call: the named searchers (and their reload), the query batcher, the query images and the
    metrics registry. Errors a client caused are HTTPExceptions."""

    def __init__(self, cfg: ServeConfig):
        self.cfg, self.Searcher = cfg, Searcher
        self.paths = cfg.named()
        set_threads(cfg.threads)
        self.searchers = {name: Searcher(path, cfg.device, text_cache=cfg.text_cache, text_runtime=cfg.text_runtime)
                          for name, path in self.paths.items()}
        self.default = next(iter(self.searchers))
        self.lock = threading.Lock()
        self.api_key = cfg.api_key or os.environ.get("PSDCLIP_API_KEY", "")
        self.images = QueryImages(cfg)
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
            out = {"status": "ok", "indices": {n: {"count": s.info.count, "factory": s.info.factory}
                                               for n, s in self.searchers.items()},
                   "image_url_search": bool(self.cfg.allowed_url_hosts)}  # (the web page shows its URL field)
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
        out = {"reloaded": name, "count": fresh.info.count}
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
        old = self.searchers[name]
        try:
            info = IndexInfo.read(self.paths[name], locate=False)
        except (OSError, InputError):
            return None
        return old.loaded if info.same_model(old.info) else None

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
            img = await run_in_threadpool(self.images.from_base64, image)
        elif image_url:
            img = await run_in_threadpool(self.images.fetch_url, image_url)
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
        except DatasetChanged as err:  # offsets into another dataset: never served
            raise HTTPException(409, str(err)) from None


# ---- routes --------------------------------------------------------------------------------------------

def image_media_type(data: bytes) -> str | None:
    """The media type of stored image bytes, by their signature (jpg, png, webp: what a build encodes), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


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
        # clip-retrieval's answer fields, then the dataset's additional columns (as its metadata columns come)
        return [{"url": r["url"], "caption": r["caption"], "id": r["id"], "similarity": r["score"], "key": r["key"],
                 **{c: r[c] for c in r if c not in ("rank", "url", "caption", "id", "score", "key", "shard",
                                                     "offset")}}
                for r in results]

    app = FastAPI(title="psdclip retrieval", version="1", lifespan=lifespan)
    app.state.service = svc
    queries = {}

    def query_route(path: str, model):
        """One declaration of a query route: the fast path answers it (Guard); FastAPI declares it with the same
        model and answer, for the OpenAPI schema and /docs."""
        queries[path] = (model, {"/search": answer_search, "/knn-service": answer_knn}[path])

        async def declared(req: model):
            response = _json(await queries[path][1](req))
            skipped = req.not_applied() if hasattr(req, "not_applied") else []
            if skipped:
                response.headers[NOT_APPLIED] = ", ".join(skipped)
            return response

        app.post(path, name=path.strip("/").replace("-", "_"))(declared)

    query_route("/search", Search)
    query_route("/knn-service", Knn)
    app.add_middleware(Guard, max_body=cfg.max_body_bytes, requests=svc.requests, latency=svc.latency, queries=queries,
                       body_timeout=cfg.body_timeout)

    @app.get("/indices-list")
    def indices_list():
        return list(svc.searchers)

    @app.post("/metadata")
    def metadata(req: Metadata):
        return svc.metadata(req.ids, req.indice_name)

    @app.get("/images/{key}")
    def image(key: str, index: Optional[str] = None):
        data = svc.image_bytes(key, index)
        kind = image_media_type(data)
        if kind is None:  # not an image's bytes (a damaged or replaced shard): never served as one
            raise HTTPException(409, f"the bytes stored for {key} are not an image: the dataset's shard changed "
                                     f"since the index was built; rebuild the index")
        return Response(data, media_type=kind, headers={"Cache-Control": "public, max-age=3600"})

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

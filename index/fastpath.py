"""The service's fast path: a pure-ASGI guard that bounds bodies, counts requests and answers the query routes
(/search, /knn-service) straight from the ASGI call, and the request models it validates them with."""
# no "from __future__ import annotations": pydantic and FastAPI read the models' annotations at run time

import asyncio
import json
import logging
import time
from typing import Optional, Union

import orjson
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .config import ServeConfig

log = logging.getLogger(__name__)


NOT_APPLIED = "x-psdclip-not-applied"  # the request's fields psdclip accepted and does not do (KnnRequest)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class Guard:
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

    def __init__(self, app, max_body: int, requests, latency, queries=None, body_timeout: float = 30.0):
        self.app, self.max_body, self.requests, self.latency = app, max_body, requests, latency
        self.body_timeout = body_timeout  # a body that stops arriving (Content-Length above what is sent) ends here
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
            if state.get("body_done"):  # (after the body: e.g. waiting for the client to disconnect)
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] != "http.request" or not message.get("more_body"):
                state["body_done"] = True
            state["received"] += len(message.get("body", b""))
            if state["received"] > self.max_body:
                raise BodyTooLarge()
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
        except BodyTooLarge:
            if not state["started"]:
                await self._reply(send, 413, f"request body over {self.max_body} bytes", state)
        except BodyTimeout:
            if not state["started"]:
                await self._reply(send, 408, f"request body not received within {self.body_timeout:g} s", state)
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
            skipped = req.not_applied() if hasattr(req, "not_applied") else []
        except HTTPException as err:
            status, content, skipped = err.status_code, {"detail": err.detail}, []
        try:
            body = orjson.dumps(content, default=str)
        except TypeError:  # what orjson refuses and json writes: a validation error echoing an integer beyond
            body = json.dumps(content, default=str).encode()  # 64 bits, or a string with a lone surrogate
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if skipped:
            head.append((NOT_APPLIED.encode(), ", ".join(skipped).encode()))
        await send({"type": "http.response.start", "status": status, "headers": head})
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
    k: int = Field(10, ge=1, le=1000, strict=True)
    modality: str = Field("image", pattern="^(image|text)$")
    index: Optional[str] = None
    dedupe: bool = False


# ClipClient's defaults for what psdclip does not do: accepted (its users send them unasked), never applied, and
# named in the answer's X-Psdclip-Not-Applied header; any other value is refused with a 422 naming the field
CLIP_CLIENT_DEFAULTS = {"aesthetic_score": (9, "9", "", None), "aesthetic_weight": (0.5, "0.5", "", None)}


def _weight(value) -> float | None:
    """aesthetic_weight as a number (None: not given); a value that is no number stays itself (refused after)."""
    if value in ("", None):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class KnnRequest(BaseModel):
    """clip-retrieval's back-end request: its fields only (an unknown one is a 422 naming it). What psdclip does not
    do is either refused, naming the field (use_mclip: true, an aesthetic re-ranking other than ClipClient's default
    request), or, for ClipClient's defaults (use_safety_model and use_violence_detector true, aesthetic_score 9 at
    weight 0.5), answered and listed as not applied in the X-Psdclip-Not-Applied header: psdclip has no safety,
    violence or aesthetic model, and ClipClient keeps working with its defaults."""
    model_config = ConfigDict(extra="forbid")
    text: Optional[str] = Field(None, max_length=1000)
    image: Optional[str] = None
    image_url: Optional[str] = None
    embedding_input: Optional[list[float]] = Field(None, max_length=8192)
    modality: str = Field("image", pattern="^(image|text)$")
    num_images: int = Field(..., ge=1, le=1000, strict=True)
    num_result_ids: Optional[int] = Field(None, ge=1, le=10000, strict=True)
    indice_name: Optional[str] = None
    deduplicate: bool = False
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Optional[Union[float, str]] = None
    aesthetic_weight: Optional[Union[float, str]] = None

    @field_validator("use_mclip")
    @classmethod
    def _no_mclip(cls, v):
        if v:
            raise ValueError("use_mclip: psdclip has no multilingual text tower (M-CLIP); send false or omit it")
        return v

    @model_validator(mode="after")
    def _no_reranking(self):
        """A re-ranking by aesthetic score is refused, but for ClipClient's default request (listed as not applied);
        a weight of 0 (or none) asks for no re-ranking, whatever the score: accepted as it is."""
        if _weight(self.aesthetic_weight) in (None, 0.0):
            return self
        for name in ("aesthetic_score", "aesthetic_weight"):
            v = getattr(self, name)
            if v not in CLIP_CLIENT_DEFAULTS[name]:
                raise ValueError(f"{name} {v!r}: psdclip has no aesthetic model to re-rank by; send aesthetic_weight 0 "
                                 f"or omit it (ClipClient's default request is accepted and listed as not applied)")
        return self

    def not_applied(self) -> list:
        """What this request asked for that psdclip accepts and does not do (ClipClient's defaults)."""
        out = [name for name in ("use_safety_model", "use_violence_detector") if getattr(self, name)]
        if self.aesthetic_score not in ("", None) and _weight(self.aesthetic_weight) not in (None, 0.0):
            out.append("aesthetic_score")
        return out


class MetadataRequest(BaseModel):
    ids: list[int] = Field(..., max_length=1000)
    indice_name: Optional[str] = None


def bounded_models(cfg: ServeConfig) -> tuple[type, type, type]:
    """(SearchRequest, KnnRequest, MetadataRequest) with this service's limits."""
    text = (Optional[str], Field(None, max_length=cfg.max_text_chars))
    return (create_model("SearchRequest", __base__=SearchRequest, text=text, k=(int, Field(10, ge=1, le=cfg.max_k, strict=True))),
            create_model("KnnRequest", __base__=KnnRequest, text=text, num_images=(int, Field(..., ge=1, le=cfg.max_k, strict=True)),
                         num_result_ids=(Optional[int], Field(None, ge=1, le=cfg.max_k * 10, strict=True))),
            create_model("MetadataRequest", __base__=MetadataRequest, ids=(list[int], Field(..., max_length=cfg.max_k))))

"""Query images: base64 bodies and image_url fetches (allowed hosts only, at every redirect hop, bounded in time,
size and concurrency) decoded under a pixel bound (decompression bombs), large images a few at a time."""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import threading
import time
import urllib.parse
import urllib.request

from fastapi import HTTPException
from PIL import Image

from ..core.urls import url_problem
from .config import ServeConfig

LARGE_IMAGE_PIXELS = 4_000_000  # images above this are decoded in one of LARGE_DECODES slots
LARGE_DECODES = 2
FETCH_SLOTS = 8  # image_url fetches at once


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Every redirect hop is checked against the allow-list like the first URL (no SSRF through a redirect)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.allowed(newurl):
            raise HTTPException(403, "image_url redirects to a host that is not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class QueryImages:
    """Decodes the images of queries (see the module docstring); errors a client caused are HTTPExceptions."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.large_decodes = threading.BoundedSemaphore(LARGE_DECODES)
        self.fetch_slots = threading.BoundedSemaphore(FETCH_SLOTS)
        self.opener = urllib.request.build_opener(_CheckedRedirects(self.allowed))

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
        """The downloader's URL check (core.urls: http(s), a parseable host, no credentials), then the allow-list."""
        if url_problem(url) is not None:
            return False
        return urllib.parse.urlsplit(url).hostname in set(self.cfg.allowed_url_hosts)

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
        except (OSError, ValueError, http.client.HTTPException):  # (> 100 headers, a chunked body cut short, ...)
            raise HTTPException(502, "could not fetch image_url") from None
        finally:
            self.fetch_slots.release()
        return self.decode_image(b"".join(chunks))

"""Polite downloading for img2dataset's Downloader: a per-host request-rate cap, back-off on HTTP 429/503 that
honours Retry-After, and a wall-clock limit per shard (a trickling or stuck host cannot hang the end of a build).

img2dataset's Downloader fetches every URL through its module function `download_image_with_retry(row,
timeout=..., retries=..., ...)`, called from its own thread pool. A shard task of ours passes a `ShardPolicy` as
the Downloader's `timeout`: a float (the per-request socket timeout, which is what img2dataset expects there) that
also carries the shard's deadline and the politeness settings, and `install()` puts `_dispatch` in place of that
function once per process. `_dispatch` sends a ShardPolicy to `fetch` and anything else (another Downloader in
the same process, e.g. a plain img2dataset run) to img2dataset's own function unchanged.

The rate cap is kept per process (all threads and tasks of a Dask worker share it): the build gives each worker
its share of the whole build's cap (`--host-rate` / workers), so the sum over workers stays within it.
"""
from __future__ import annotations

import functools
import http.client
import io
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from ..core.local import read
from ..core.urls import redact, retry_after_seconds, url_problem
from .robots import AGENT, ROBOTS, TIMEOUT

INFO_URL = "https://pypi.org/project/psdclip/"
THROTTLED = (429, 503)  # the codes a host uses to say "slow down / come back later"
CHUNK = 1 << 16


class ShardPolicy(float):
    """The per-request timeout (its float value) plus what one shard's download must respect."""

    def __new__(cls, timeout: float, *, deadline: float, shard_timeout: float, host_interval: float = 0.0,
                throttle_retries: int = 3, backoff: float = 1.0, max_backoff: float = 60.0,
                request_timeout: float = 60.0, robots: bool = True, user_agent: str | None = None,
                user_agent_token: str | None = None, build_id: str = "", local_root: str = "",
                max_bytes: int = 50 * 1024 * 1024):
        self = super().__new__(cls, timeout)
        self.max_bytes = max_bytes  # --max-image-bytes: a body is never read past this (streamed, never whole)
        self.local_root = local_root  # --local-root: file:// rows are read from under it (core.local)
        self.robots = robots  # honour robots.txt (robots.py), its answers kept per build
        self.build_id = build_id
        self.user_agent = user_agent or default_user_agent(user_agent_token)
        self.agents = tuple(a for a in (AGENT, user_agent_token) if a)  # the names robots.txt rules match
        self.request_timeout = request_timeout  # one response, whole (a host trickling a byte a second ends here)
        self.deadline = deadline  # time.monotonic() value after which no request starts or continues
        self.shard_timeout = shard_timeout
        self.host_interval = host_interval  # seconds between request starts to one host in this process; 0: none
        self.throttle_retries = throttle_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        return self

    @classmethod
    def starting_now(cls, timeout: float, shard_timeout: float, **kw) -> "ShardPolicy":
        return cls(timeout, deadline=time.monotonic() + shard_timeout, shard_timeout=shard_timeout, **kw)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    @property
    def expired_message(self) -> str:
        return (f"timeout: the shard's time limit (--shard-timeout {self.shard_timeout:g} s) ran out before this row "
                f"finished")


@functools.lru_cache(maxsize=1)
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("psdclip")
    except PackageNotFoundError:
        return "0"


def default_user_agent(token: str | None = None) -> str:
    """An identifiable User-Agent, as site owners ask of crawlers: the product and where to read about it (and
    the operator's token, img2dataset's `--user-agent-token`, in the form img2dataset sends it)."""
    return f"psdclip/{version()} (compatible; {token}; +{INFO_URL})" if token else f"psdclip/{version()} (+{INFO_URL})"


class HostLimiter:
    """When each host may next be asked: request starts to one host are at least `interval` apart, and a host that
    asked for a pause (Retry-After, back-off) gets no request before its pause ends. Thread-safe."""

    def __init__(self):
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, host: str, interval: float, deadline: float) -> float | None:
        """Reserve the next start time for `host`; returns how long to sleep before it, or None when that start
        would fall after `deadline` (nothing is reserved then)."""
        with self._lock:
            now = time.monotonic()
            if len(self._next) > 100_000:  # a long-lived worker meets many hosts: forget those free to ask now
                self._next = {h: t for h, t in self._next.items() if t > now}
            start = max(now, self._next.get(host, 0.0))
            if start >= deadline:
                return None
            if interval > 0 or host in self._next:
                self._next[host] = start + interval
            return start - now

    def pause(self, host: str, until: float) -> None:
        with self._lock:
            self._next[host] = max(self._next.get(host, 0.0), until)

    def paused_until(self, host: str) -> float:
        with self._lock:
            return self._next.get(host, 0.0)


LIMITER = HostLimiter()  # one per process


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Every redirect hop passes the same check as the first URL (core.urls.url_problem: http(s) only, a host, no
    credentials); a refused hop ends the row `redirect_refused` (urllib itself would follow http -> ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        problem = url_problem(newurl)
        if problem:
            raise urllib.error.HTTPError(req.full_url, code, f"redirect refused: {redact(newurl)}: {problem}",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_CheckedRedirects())


def _get(url: str, policy: ShardPolicy, user_agent_token, disallowed):
    """One request. Returns (image bytes stream or None, error message or None, HTTP code or None, Retry-After
    seconds or None). The body is read one receive at a time, so the shard's deadline stops a trickling host."""
    from img2dataset.downloader import is_disallowed

    request = urllib.request.Request(url, data=None, headers={"User-Agent": policy.user_agent})
    ends = min(policy.deadline, time.monotonic() + policy.request_timeout)  # the whole response's deadline
    try:
        with _OPENER.open(request, timeout=float(policy)) as r:
            if disallowed and is_disallowed(r.headers, user_agent_token, disallowed):
                return None, "Use of image disallowed by X-Robots-Tag directive", None, None
            if r.length is not None and r.length > policy.max_bytes:  # said up front: nothing is read
                return None, _too_large(r.length, policy), None, None
            buf = io.BytesIO()
            while True:
                if policy.expired():
                    return None, policy.expired_message, None, None
                if time.monotonic() >= ends:
                    return None, (f"timeout: the response took longer than --request-timeout "
                                  f"{policy.request_timeout:g} s"), None, None
                chunk = r.read1(CHUNK)
                if not chunk:
                    break
                if buf.tell() + len(chunk) > policy.max_bytes:  # no Content-Length (or a wrong one): stop here
                    return None, _too_large(None, policy), None, None
                buf.write(chunk)
            if r.length:  # the connection ended before Content-Length bytes came (read() would raise this)
                raise http.client.IncompleteRead(buf.getvalue(), r.length)
            buf.seek(0)
            return buf, None, 200, None
    except urllib.error.HTTPError as err:
        retry_after = retry_after_seconds(err.headers.get("Retry-After")) if err.headers else None
        return None, str(err), err.code, retry_after
    except Exception as err:  # pylint: disable=broad-except  (as img2dataset: every failure is a row's status)
        return None, str(err) or type(err).__name__, None, None


def _too_large(length, policy: ShardPolicy) -> str:
    said = f" ({length:,} bytes said)" if length else ""
    return f"file too large: the response is over --max-image-bytes {policy.max_bytes:,}{said}; not read on"


def fetch(row, policy: ShardPolicy, retries: int, user_agent_token=None, disallowed=None, limiter=LIMITER):
    """img2dataset's download_image_with_retry under a ShardPolicy: returns (key, stream or None, error or None)."""
    key, url = row
    if policy.local_root and url.startswith("file:"):
        stream, err = read(url, policy.local_root, limit=policy.max_bytes)
        return key, stream, err
    problem = url_problem(url)  # (the clean stage refused these already; a row is never a task's crash)
    if problem:
        return key, None, f"invalid URL: {problem}"
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if policy.robots:
        refused = ROBOTS.check(url, list(policy.agents), policy.user_agent, _OPENER, scope=policy.build_id,
                               timeout=max(1.0, min(TIMEOUT, policy.deadline - time.monotonic())))
        if refused:
            return key, None, refused
    failures = throttled = 0
    while True:
        wait = limiter.reserve(host, policy.host_interval, policy.deadline)
        if wait is None:
            if limiter.paused_until(host) >= policy.deadline:
                return key, None, (f"HTTP Error 429: {host} asked for a pause that outlasts this shard's time "
                                   f"limit (Retry-After or back-off); not tried")
            return key, None, policy.expired_message
        if wait > 0:
            time.sleep(wait)
        stream, err, code, retry_after = _get(url, policy, user_agent_token, disallowed)
        if stream is not None:
            return key, stream, None
        if code in THROTTLED:
            if throttled >= policy.throttle_retries:
                return key, None, err
            delay = retry_after if retry_after is not None else policy.backoff * 2 ** throttled * random.uniform(1, 1.5)
            limiter.pause(host, time.monotonic() + delay)  # every thread of this process waits for this host
            if delay > policy.max_backoff:
                return key, None, f"{err} (Retry-After {delay:.0f} s exceeds --max-backoff {policy.max_backoff:g} s)"
            throttled += 1
            continue
        if policy.expired() or failures >= retries:
            return key, None, err
        failures += 1


_original = None


def _dispatch(row, timeout, retries, user_agent_token, disallowed_header_directives):
    if isinstance(timeout, ShardPolicy):
        return fetch(row, timeout, retries, user_agent_token, disallowed_header_directives)
    return _original(row, timeout=timeout, retries=retries, user_agent_token=user_agent_token,
                     disallowed_header_directives=disallowed_header_directives)


def install() -> None:
    """Route img2dataset's per-URL download through `_dispatch` (idempotent, once per process)."""
    global _original  # pylint: disable=global-statement
    import img2dataset.downloader as d

    if d.download_image_with_retry is not _dispatch:
        _original = d.download_image_with_retry
        d.download_image_with_retry = _dispatch

"""The one check of a URL that psdclip may fetch (the downloader at every redirect hop, the service's image_url), and
the defensive reading of headers a host controls: a bad value is a row's status or a 4xx, never a crash."""
from __future__ import annotations

import email.utils
import re
import time
import urllib.parse

_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() also takes '²', which float() refuses


NOT_UTF8 = "not-utf8:"  # a list's URL that held a lone surrogate, as the list reader passes it on (refused by name)


def url_problem(url: str) -> str | None:
    """Why `url` must not be fetched (None when it may): http(s) only, a host, a valid port, no credentials
    (user:password@ is refused and never printed), no whitespace or backslash in the authority."""
    if not isinstance(url, str) or not url:
        return "empty URL"
    if url.startswith(NOT_UTF8):
        return "not valid UTF-8 text (the list holds a lone surrogate, e.g. a JSON \\ud800 escape)"
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            return f"scheme {scheme}: only http and https are fetched" if scheme else "not an absolute URL"
        if "\\" in parts.netloc or any(c.isspace() for c in parts.netloc):
            return "malformed http(s) URL (a backslash or space in the host part)"
        if "@" in parts.netloc:
            return "the URL holds credentials (user:password@host): refused"
        if not parts.hostname:
            return "malformed http(s) URL (no host)"
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as err:
        return f"malformed http(s) URL ({err})"
    return None


def redact(url: str) -> str:
    """`url` with any user:password@ replaced by ***@ (what may be printed or stored of a refused URL)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@", r"\1***@", url) if isinstance(url, str) else url


def retry_after_seconds(value, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110); None if absent or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    try:
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (OverflowError, OSError, ValueError):
        return None

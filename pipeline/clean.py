"""Per-partition clean and filter stages (pandas in, pandas out), run as Dask tasks.

Each stage is a small function of a DataFrame with columns url, caption, source, source_row, status,
error, testable on a plain in-memory frame. A row keeps the first status a stage gives it; rows still
'pending' go on to be downloaded. The string work is vectorised with pyarrow compute; only the rows
that need it go through Python (ftfy, IRI encoding, error texts).
"""
from __future__ import annotations

import re
import urllib.parse

import ftfy
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core.local import is_local, resolve
from ..core.urls import NOT_UTF8, redact, url_problem
from .keys import add_url_keys
from .status import PENDING

_WS = re.compile(r"\s+")
# what ftfy can change: mojibake (a UTF-8 lead byte read as Latin-1/cp1252 followed by a continuation
# byte), HTML entities, control and C1 characters, ligatures, full-width forms, curly quotes, combining
# marks (NFC), terminal escapes. Plain accented text ("Café") does not match and skips ftfy.
_FTFY_SUSPECT = ("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
                 "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
                 "|&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);?|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufb00-\ufb06"
                 "\uff01-\uff5e\u2018\u2019\u201c\u201d\u0300-\u036f\ufffd]|\x1b")


def start(df: pd.DataFrame) -> pd.DataFrame:
    """Add the status and error columns every later stage relies on; strings become Arrow-backed."""
    df = df.copy()
    df["url"] = pd.array(df["url"], dtype="string[pyarrow]")
    df["caption"] = pd.array(df["caption"], dtype="string[pyarrow]")
    df["status"] = PENDING
    df["error"] = ""
    return df


def _mark(df: pd.DataFrame, mask, status: str, error) -> None:
    mask = np.asarray(mask, dtype=bool) & (df["status"].to_numpy() == PENDING)
    if mask.any():
        df.loc[mask, "status"] = status
        df.loc[mask, "error"] = error if isinstance(error, str) else np.asarray(error, dtype=object)[mask]


def _fix_one(text: str) -> str:
    return _WS.sub(" ", ftfy.fix_text(text, normalization="NFC")).strip()


def fix_captions(df: pd.DataFrame) -> pd.DataFrame:
    """Repair mojibake, HTML entities and the rest with ftfy (only where a caption can need it), and
    collapse whitespace."""
    caps = pa.array(df["caption"].array)
    needs = pc.match_substring_regex(caps, _FTFY_SUSPECT).to_numpy(zero_copy_only=False)
    spaces = pc.match_substring_regex(caps, r"\s\s|^\s|\s$|[\t\n\r\f\v]").to_numpy(zero_copy_only=False)
    touch = needs | spaces
    if touch.any():
        idx = np.flatnonzero(touch)
        # web captions repeat ("image", product titles): fix each distinct caption once
        codes, uniques = pd.factorize(pd.Series(caps.take(pa.array(idx)).to_pylist(), dtype=object))
        first_need = pd.Series(needs[idx]).groupby(codes).any().to_numpy()
        repaired = np.array([_fix_one(c) if n else _WS.sub(" ", c).strip() for c, n in zip(uniques, first_need)],
                            dtype=object)
        fixed = pa.array(repaired[codes], type=caps.type)
        df["caption"] = pd.arrays.ArrowStringArray(pc.replace_with_mask(caps, pa.array(touch), fixed))
    return df


def filter_captions(df: pd.DataFrame, max_length: int) -> pd.DataFrame:
    """Mark empty captions (a .txt list has none: all its rows) and over-long ones."""
    lengths = pc.utf8_length(pa.array(df["caption"].array)).to_numpy(zero_copy_only=False)
    _mark(df, lengths == 0, "empty_caption", "caption is empty")
    _mark(df, lengths > max_length, "caption_too_long", f"caption longer than {max_length} characters")
    return df


def _iri_to_uri(url: str) -> str:
    """Percent-encode a non-ASCII URL (IDNA for the host), as browsers do."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname.encode("idna").decode("ascii") if parts.hostname else ""
        netloc = host if ":" not in host else f"[{host}]"
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            cred = urllib.parse.quote(parts.username) + (f":{urllib.parse.quote(parts.password)}" if parts.password else "")
            netloc = f"{cred}@{netloc}"
        safe = "/%:@!$&'()*+,;=-._~"
        return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=safe),
                                        urllib.parse.quote(parts.query, safe=safe + "?"),
                                        urllib.parse.quote(parts.fragment, safe=safe + "?")))
    except (UnicodeError, ValueError):
        return ""


_OK_URL = r"^(?i:https?)://[^/?#\s]+[^\s]*$"
_ODD_AUTHORITY = r"^(?i:https?)://[^/?#]*[@\[\]:\\]"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


def _url_error(url: str) -> str:
    if not url or url.startswith(NOT_UTF8):
        return url_problem(url)
    m = _SCHEME.match(url)
    if not m:
        return "not an absolute URL"
    scheme = m.group(1).lower()
    if scheme in ("http", "https"):
        return "malformed http(s) URL"
    return f"scheme {scheme}: only http and https are fetched"


def check_urls(df: pd.DataFrame, local_root: str = "") -> pd.DataFrame:
    """Only http(s) URLs with a host are ever fetched; file://, data:, ftp:// and the rest are invalid_url.
    Non-ASCII URLs are percent-encoded; the host (lower case) is added for the host-spreading stage. With a
    local root, a path or file:// URL becomes the file:// URL of the file it resolves to inside the root (host
    empty), or invalid_url with the reason (core.local.resolve)."""
    if local_root:
        return _local_urls(df, local_root)
    urls = pc.utf8_trim_whitespace(pa.array(df["url"].array))
    non_ascii = ~pc.string_is_ascii(urls).to_numpy(zero_copy_only=False)
    if non_ascii.any():
        values = np.asarray(urls.to_pylist(), dtype=object)
        values[non_ascii] = [_iri_to_uri(u) for u in values[non_ascii]]
        urls = pa.array(values, type=pa.string())
    df["url"] = pd.arrays.ArrowStringArray(urls)
    ok = pc.match_substring_regex(urls, _OK_URL).to_numpy(zero_copy_only=False)
    # an authority with credentials, a port, brackets or a backslash is parsed in full (core.urls.url_problem): a URL
    # that cannot be parsed, holds user:password@ (refused, and stored redacted) or names port 99999 is invalid here,
    # never a crash or a "connection error" later
    odd = ok & pc.match_substring_regex(urls, _ODD_AUTHORITY).to_numpy(zero_copy_only=False)
    if odd.any():
        idx = np.flatnonzero(odd)
        problems = [url_problem(u) for u in urls.take(pa.array(idx)).to_pylist()]
        bad = idx[[p is not None for p in problems]]
        if len(bad):
            errors = np.full(len(df), "", dtype=object)
            errors[bad] = [p for p in problems if p is not None]
            ok[bad] = False
            _mark(df, np.isin(np.arange(len(df)), bad), "invalid_url", errors)
            values = np.asarray(urls.to_pylist(), dtype=object)
            values[bad] = [redact(u) for u in values[bad]]
            urls = pa.array(values, type=pa.string())
            df["url"] = pd.arrays.ArrowStringArray(urls)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        errors = np.full(len(df), "", dtype=object)
        errors[bad] = [_url_error(u) for u in urls.take(pa.array(bad)).to_pylist()]
        _mark(df, ~ok, "invalid_url", errors)
    df["host"] = pd.arrays.ArrowStringArray(hosts(urls, ok))
    return df


def _local_urls(df: pd.DataFrame, root: str) -> pd.DataFrame:
    """check_urls with --local-root: local rows resolved here, the web rows checked as always."""
    values = np.asarray(pd.Series(df["url"]).fillna("").astype(str).str.strip().to_numpy(), dtype=object)
    local = np.array([is_local(u) for u in values], dtype=bool)
    web = df[~local].copy()
    if len(web):
        web = check_urls(web)
    out = df[local].copy()
    if len(out):
        resolved = [resolve(u, root) for u in values[local]]
        out["url"] = pd.arrays.ArrowStringArray(pa.array([r or redact(u) for (r, _), u in zip(resolved, values[local])],
                                                         pa.string()))
        errors = np.array([why or "" for _, why in resolved], dtype=object)
        refused = np.array([why is not None for _, why in resolved], dtype=bool)
        if refused.any():
            _mark(out, refused, "invalid_url", errors)
        out["host"] = pd.arrays.ArrowStringArray(pa.array([""] * len(out), pa.string()))
    web["_pos"], out["_pos"] = np.flatnonzero(~local), np.flatnonzero(local)
    res = pd.concat([web, out]).sort_values("_pos", kind="stable").drop(columns="_pos")
    res.index = df.index
    return res


def hosts(urls: pa.Array, ok) -> pa.Array:
    """The authority after "http(s)://" up to the first "/", lower case, for the rows where ok (a cheap
    split; spreading the load needs no exact parse)."""
    rest = pc.utf8_slice_codeunits(urls, 7)
    rest = pc.if_else(pc.starts_with(rest, "/"), pc.utf8_slice_codeunits(rest, 1), rest)
    host = pc.list_element(pc.split_pattern(rest, "/", max_splits=1), 0)
    return pc.if_else(pa.array(np.asarray(ok, dtype=bool)), pc.utf8_lower(host), "")


def clean_partition(df: pd.DataFrame, max_caption_length: int, local_root: str = "") -> pd.DataFrame:
    """The whole per-partition chain, in order."""
    df = start(df)
    df = check_urls(df, local_root)
    df = fix_captions(df)
    df = filter_captions(df, max_caption_length)
    return add_url_keys(df)

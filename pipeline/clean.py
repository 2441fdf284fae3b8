"""Per-partition clean and filter stages (pandas in, pandas out), run as Dask tasks.

Each stage is a small function of a DataFrame with columns url, caption, source, source_row, status,
error, testable on a plain in-memory frame. A row keeps the first status a stage gives it; rows still
'pending' go on to be downloaded.
"""
from __future__ import annotations

import re
import urllib.parse

import ftfy
import numpy as np
import pandas as pd

PENDING = "pending"
_WS = re.compile(r"\s+")
_NEEDS_FTFY = re.compile(r"[^\x20-\x7e]|&|<")


def start(df: pd.DataFrame) -> pd.DataFrame:
    """Add the status and error columns every later stage relies on."""
    df = df.copy()
    df["status"] = PENDING
    df["error"] = ""
    return df


def _mark(df: pd.DataFrame, mask, status: str, error) -> None:
    mask = np.asarray(mask, dtype=bool) & (df["status"].to_numpy() == PENDING)
    if mask.any():
        df.loc[mask, "status"] = status
        df.loc[mask, "error"] = error if isinstance(error, str) else np.asarray(error)[mask]


def fix_captions(df: pd.DataFrame) -> pd.DataFrame:
    """Repair mojibake and HTML entities with ftfy (only where a caption can need it), collapse whitespace."""
    caps = df["caption"]
    needs = caps.str.contains(_NEEDS_FTFY, regex=True)
    if needs.any():
        df.loc[needs, "caption"] = [ftfy.fix_text(c, normalization="NFC") for c in caps[needs]]
        caps = df["caption"]
    ws = caps.str.contains(r"\s\s|^\s|\s$|[\t\n\r\f\v]", regex=True)
    if ws.any():
        df.loc[ws, "caption"] = [_WS.sub(" ", c).strip() for c in caps[ws]]
    return df


def filter_captions(df: pd.DataFrame, max_length: int, require: bool = True) -> pd.DataFrame:
    """Mark empty captions (when the list has a caption column) and over-long ones."""
    lengths = df["caption"].str.len().to_numpy()
    if require:
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


_HTTP = re.compile(r"^https?://[^/?#\s]+", re.IGNORECASE)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_HOST = re.compile(r"^https?://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]*)", re.IGNORECASE)


def check_urls(df: pd.DataFrame) -> pd.DataFrame:
    """Only http(s) URLs with a host are ever fetched; file://, data:, ftp:// and the rest are invalid_url.
    Non-ASCII URLs are percent-encoded; the host (lower case) is added for the host-spreading stage."""
    urls = df["url"].str.strip()
    non_ascii = urls.str.contains(r"[^\x00-\x7f]", regex=True)
    if non_ascii.any():
        urls = urls.copy()
        urls[non_ascii] = [_iri_to_uri(u) for u in urls[non_ascii]]
    df["url"] = urls
    ok = urls.str.contains(_HTTP, regex=True).to_numpy() & ~urls.str.contains(r"\s", regex=True).to_numpy()
    if not ok.all():
        schemes = urls.str.extract(_SCHEME, expand=False).fillna("")
        errors = np.where(urls.to_numpy() == "", "empty URL",
                          np.where(schemes.to_numpy() == "", "not an absolute URL",
                                   "scheme " + schemes.str.lower().to_numpy().astype(object)
                                   + ": only http and https are fetched"))
        errors = np.where((schemes.str.lower().isin(["http", "https"])).to_numpy(), "malformed http(s) URL", errors)
        _mark(df, ~ok, "invalid_url", errors)
    df["host"] = urls.str.extract(_HOST, expand=False).fillna("").str.lower()
    return df


def clean_partition(df: pd.DataFrame, max_caption_length: int, require_caption: bool) -> pd.DataFrame:
    """The whole per-partition chain, in order."""
    df = start(df)
    df = check_urls(df)
    df = fix_captions(df)
    return filter_captions(df, max_caption_length, require_caption)

"""Read URL lists (txt/csv/tsv/parquet/jsonl, optionally .gz) from local or fsspec paths.

Each reader returns a DataFrame with columns url, caption (str), source (the path), source_row (row number
in that file, 0-based), and, for each column named in `extra` (img2dataset's --save_additional_columns), a text
column EXTRA + name (null where the file has no such column: a column missing from some inputs is null there). A missing column or an undecodable file raises InputError naming the file (and
the line, where there is one).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .config import INPUT_FORMATS
from ..core.errors import InputError
from ..core.urls import NOT_UTF8

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
EXTRA = "extra:"  # the prefix of an input's additional columns while they travel through the build's stages


def _text(v):
    """A JSON or Parquet value as the text an extra column holds (None stays null)."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        try:
            return json.dumps(v, ensure_ascii=False, default=str)
        except (RecursionError, ValueError):  # nested past what can be written back as JSON text
            return None
    return str(v)


def _add_extras(df: pd.DataFrame, extra, column) -> pd.DataFrame:
    """df with EXTRA+name for every name of `extra`; column(name) gives its values, or None when it is absent."""
    for name in extra:
        values = column(name)
        df[EXTRA + name] = pd.array([None] * len(df) if values is None else [_text(v) for v in values],
                                    dtype="string[pyarrow]")
    return df


def detect_format(path: str, declared: str | None = None) -> str:
    if declared:
        return declared
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    ending = name.rsplit(".", 1)[-1] if "." in name.rsplit("/", 1)[-1] else ""
    if ending == "json" or ending == "ndjson":
        ending = "jsonl"
    if ending not in INPUT_FORMATS:
        raise InputError(f"{path}: cannot tell the input format from the file ending; pass --input-format "
                         f"({'/'.join(INPUT_FORMATS)})")
    return ending


def _read_bytes(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as err:  # pylint: disable=broad-except  (a corrupt .gz, remote storage without credentials)
        raise InputError(f"{path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte offset {err.start}); is it the right format?") from None


def _check_columns(path: str, present, url_col: str, caption_col: str | None, fmt: str) -> None:
    present = list(present)
    for col in (url_col, caption_col):  # (pandas renames a repeated name NAME.1)
        if col and (present.count(col) > 1 or f"{col}.1" in present):
            raise InputError(f"{path}: the header names column {col!r} more than once; which one holds the "
                             f"{'URLs' if col == url_col else 'captions'} is ambiguous")
    if url_col not in present:
        raise InputError(f"{path}: no column {url_col!r} (columns: {', '.join(map(str, present)) or 'none'}); "
                         f"set --url-col")
    if caption_col and caption_col not in present:
        raise InputError(f"{path}: no column {caption_col!r} (columns: {', '.join(map(str, present))}); "
                         f"set --caption-col")


def _read_csv_arrow(path: str, raw: bytes, sep: str, url_col: str, caption_col: str | None, column_names=None,
                    extra=()):
    """The fast path: pyarrow's multi-threaded CSV reader, every column read as text. Returns None when
    the file needs the careful path (malformed rows, bad UTF-8), which reports the line."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    first = raw.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        names = list(column_names) if column_names else next(csv.reader([first.decode("utf-8")], delimiter=sep))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        return None
    if not names or not raw.strip():
        return None
    _check_columns(path, names, url_col, caption_col, "csv")
    try:
        table = pcsv.read_csv(
            pa.BufferReader(raw), parse_options=pcsv.ParseOptions(delimiter=sep, newlines_in_values=True),
            read_options=pcsv.ReadOptions(column_names=names) if column_names else None,
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False,
                                                include_columns=[url_col] + ([caption_col] if caption_col else [])
                                                + [c for c in extra if c in names and c not in (url_col, caption_col)]))
    except (pa.ArrowInvalid, pa.ArrowKeyError):
        return None
    df = pd.DataFrame({"url": pd.arrays.ArrowStringArray(table.column(url_col).combine_chunks())})
    df["caption"] = (pd.arrays.ArrowStringArray(table.column(caption_col).combine_chunks()) if caption_col
                     else pd.array([""] * len(df), dtype="string[pyarrow]"))
    df["source"] = path
    df["source_row"] = np.arange(len(df), dtype=np.int64)
    return _add_extras(df, extra, lambda c: table.column(c).to_pylist() if c in table.column_names else None)


def _finish(path: str, urls, captions) -> pd.DataFrame:
    df = pd.DataFrame({"url": urls, "caption": captions})
    df["url"] = df["url"].fillna("").astype(str)
    df["caption"] = df["caption"].fillna("").astype(str)
    for column, fix in (("url", _not_utf8_url), ("caption", _utf8_text)):  # (a JSON "\ud800" escape)
        try:
            pa.array(df[column], pa.string())
        except (pa.ArrowException, UnicodeError):  # a lone surrogate: that row's value alone is mended
            df[column] = [fix(v) for v in df[column]]
    df["source"] = path
    df["source_row"] = pd.RangeIndex(len(df), dtype="int64")
    return df


def _not_utf8_url(url: str) -> str:
    """A URL holding a lone surrogate (no valid UTF-8 text, so no URL anyone can fetch) as one that the clean stage
    refuses by name (core.urls.NOT_UTF8); a valid one as it is."""
    try:
        url.encode("utf-8")
        return url
    except UnicodeEncodeError:
        return NOT_UTF8 + url.encode("utf-8", "backslashreplace").decode("ascii", "replace")[:200]


def _utf8_text(text: str) -> str:
    """Text with any lone surrogate replaced (by '?')."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _scalar_text(v) -> str:
    """A JSON value in a url or caption field as text: a string as it is, a number as text, anything else (an
    object, an array, null) as empty (the row then ends with its status, never the list)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
        return str(v)
    return ""


_CSV_LINE = re.compile(r"line (\d+)")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # a JSON \ud800-\udfff escape


def read_url_list(path: str, input_format: str | None = None, url_col: str = "url",
                  caption_col: str | None = "caption", raw: bytes | None = None, column_names=None,
                  extra=()) -> pd.DataFrame:
    """column_names: for csv/tsv files without a header row (CC3M, CC12M), the names of their columns; extra: the
    additional columns to keep (see the module docstring)."""
    df = _read_url_list(path, input_format, url_col, caption_col, raw, column_names, tuple(extra))
    if extra and not any(c.startswith(EXTRA) for c in df.columns):  # (the formats without extra columns: txt)
        df = _add_extras(df, extra, lambda c: None)
    return df


def _read_url_list(path, input_format, url_col, caption_col, raw, column_names, extra) -> pd.DataFrame:
    fmt = detect_format(path, input_format)
    if fmt == "txt":
        caption_col = None
    raw = _read_bytes(path) if raw is None else raw
    if fmt == "parquet":
        return read_parquet_list(path, url_col, caption_col, raw=raw, extra=extra)
    if fmt in ("csv", "tsv"):
        fast = _read_csv_arrow(path, raw, "," if fmt == "csv" else "\t", url_col, caption_col, column_names, extra)
        if fast is not None:
            return fast
    text = _decode(path, raw)
    if fmt == "txt":
        lines = text.splitlines()
        urls = [ln.strip() for ln in lines]
        return _finish(path, urls, [""] * len(urls))
    if not text.strip():
        return _finish(path, [], [])
    if fmt in ("csv", "tsv"):
        try:
            df = pd.read_csv(io.StringIO(text), sep="," if fmt == "csv" else "\t", dtype=str,
                             keep_default_na=False, na_filter=False, engine="c",
                             header=None if column_names else "infer", names=column_names or None)
        except pd.errors.ParserError as err:
            m = _CSV_LINE.search(str(err))
            where = f":{m.group(1)}" if m else ""
            raise InputError(f"{path}{where}: malformed {fmt.upper()} ({str(err).splitlines()[-1].strip()})") from None
        except pd.errors.EmptyDataError:
            return _finish(path, [], [])
        _check_columns(path, df.columns, url_col, caption_col, fmt)
        out = _finish(path, df[url_col].to_numpy(), df[caption_col].to_numpy() if caption_col else [""] * len(df))
        return _add_extras(out, extra, lambda c: df[c].tolist() if c in df.columns else None)
    # jsonl
    try:
        if _SURROGATE_ESCAPE.search(text):  # pandas' reader drops a lone high surrogate (another URL!): Python's keeps it
            _check_json_lines(path, text)
            df = pd.DataFrame([json.loads(line) for line in text.splitlines() if line.strip()])
        else:
            df = pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except InputError:
        raise
    except Exception:  # pylint: disable=broad-except  (pandas raises several kinds; the line scan names the line)
        _check_json_lines(path, text)
        raise InputError(f"{path}: malformed JSON lines") from None
    if df.empty:
        return _finish(path, [], [])
    if url_col not in df.columns or not all(isinstance(c, str) for c in df.columns):
        _check_json_lines(path, text)  # an array line makes integer columns: name the line, not a missing column
    _check_columns(path, df.columns, url_col, caption_col, fmt)
    urls = df[url_col].map(_scalar_text)
    caps = df[caption_col].map(_scalar_text) if caption_col else [""] * len(df)
    out = _finish(path, urls.to_numpy(), caps if isinstance(caps, list) else caps.to_numpy())
    return _add_extras(out, extra, lambda c: df[c].tolist() if c in df.columns else None)


def _check_json_lines(path: str, text: str) -> None:
    """A one-line error naming the first line of a JSON-lines list that is not a JSON object."""
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{i}: malformed JSON line ({err.msg})") from None
            except RecursionError:
                raise InputError(f"{path}:{i}: a JSON line nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{i}: each JSON line must be an object, got {type(obj).__name__}")


def _text_column(path: str, table: pa.Table, name: str):
    """A Parquet column of a URL list as text: strings, or numbers cast to text; a list, struct, map or binary column
    is one line naming it and its type."""
    column = table.column(name)
    t = column.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_null(t) or pa.types.is_dictionary(t)):
        raise InputError(f"{path}: column {name!r} holds {t}, not text (a URL list's {name} is a string column)")
    try:
        return column.cast(pa.string())
    except pa.ArrowException as err:
        raise InputError(f"{path}: column {name!r} ({t}) cannot be read as text ({err})") from None


def read_parquet_list(path: str, url_col: str = "url", caption_col: str | None = "caption", raw: bytes | None = None,
                      row_groups=None, extra=()) -> pd.DataFrame:
    """A Parquet URL list from its bytes, or (raw=None) opened through fsspec; row_groups: only those (a part of a
    large file read by one task)."""
    cols = [url_col] + ([caption_col] if caption_col else [])
    try:
        with (contextlib.nullcontext(io.BytesIO(raw)) if raw is not None else fsspec.open(path, "rb")) as f:
            pf = pq.ParquetFile(f)
            _check_columns(path, pf.schema_arrow.names, url_col, caption_col, "parquet")
            cols += [c for c in extra if c in pf.schema_arrow.names and c not in cols]
            table = pf.read(columns=cols) if row_groups is None else pf.read_row_groups(list(row_groups), columns=cols)
    except InputError:
        raise
    except Exception as err:  # pylint: disable=broad-except  (not Parquet; remote storage that refuses us)
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    url = _text_column(path, table, url_col).to_pandas()
    cap = _text_column(path, table, caption_col).to_pandas() if caption_col else [""] * table.num_rows
    out = _finish(path, url.to_numpy(), cap if isinstance(cap, list) else cap.to_numpy())
    return _add_extras(out, extra, lambda c: table.column(c).to_pylist() if c in table.column_names else None)

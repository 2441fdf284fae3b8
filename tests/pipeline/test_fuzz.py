"""A fuzz layer over the URL list reader and the clean stage (hypothesis): arbitrary rows, of arbitrary JSON and
text values, in JSON lines, CSV and Parquet, end as one row each with one status (or the whole file as one line
naming it), never a traceback, and every value is text the build's Arrow stages can hold. The service's own fuzz is
the schemathesis test over its OpenAPI schema (tests/index/test_service.py)."""
import csv
import io
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings, strategies as st

from psdclip.core.errors import InputError
from psdclip.pipeline.clean import clean_partition
from psdclip.pipeline.read import read_url_list
from psdclip.pipeline.status import PENDING

# text with what lists carry: URLs and near-URLs, non-ASCII, controls, lone surrogates, quotes and separators
_URLISH = st.one_of(
    st.text(max_size=40),
    st.builds(lambda host, path: f"http://{host}/{path}", st.text(min_size=0, max_size=12), st.text(max_size=20)),
    st.sampled_from(["http://a.test/x.jpg", "https://b.test/y.png?q=1", "file:///etc/passwd", "ftp://c.test/z",
                     "http://u:pw@d.test/", "http://[::1/x", "http://e.test:99999/", "data:image/png;base64,AA",
                     "http://xn--caf-dma.test/é.jpg", "  http://a.test/pad.jpg  ", "http://\ud800.test/"]))
_JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _URLISH),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)
ROWS = st.lists(st.fixed_dictionaries({"url": st.one_of(_URLISH, _JSON_VALUE), "caption": _JSON_VALUE}),
                min_size=1, max_size=25)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_status_per_row(df: pd.DataFrame, n: int) -> None:
    assert len(df) == n
    pa.Table.from_pandas(df[["url", "caption"]])  # text Arrow holds (the build's stages exchange Arrow)
    out = clean_partition(df, max_caption_length=200)
    assert len(out) == n
    pending = (out["status"] == PENDING).to_numpy()
    assert all(len(k) == 20 for k in out["ukey"][pending])  # every row to download has its key (a hash of its URL)
    statuses = out["status"].astype(str)
    assert statuses.notna().all() and (statuses != "").all()
    assert set(statuses) <= {PENDING, "invalid_url", "empty_caption", "caption_too_long"}, set(statuses)


@FUZZ
@given(rows=ROWS)
def test_json_lines_of_any_values_give_one_status_per_row(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    try:
        df = read_url_list(str(path))
    except InputError as err:  # a file refused as a whole: one line naming it
        assert str(path) in str(err) and "\n" not in str(err)
        return
    _one_status_per_row(df, len(rows))


@FUZZ
@given(rows=st.lists(st.tuples(_URLISH, st.text(max_size=30)), min_size=1, max_size=25))
def test_csv_of_any_text_gives_one_status_per_row(tmp_path_factory, rows):
    rows = [(u.encode("utf-8", "replace").decode(), c.encode("utf-8", "replace").decode()) for u, c in rows]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["url", "caption"])
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("fuzz") / "rows.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    try:
        df = read_url_list(str(path))
    except InputError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    _one_status_per_row(df, len(rows))


_ARROW_COLUMN = st.sampled_from([pa.string(), pa.large_string(), pa.int64(), pa.float64(), pa.binary(),
                                 pa.list_(pa.string()), pa.struct([("u", pa.string())]), pa.null()])


@FUZZ
@given(url_type=_ARROW_COLUMN, caption_type=_ARROW_COLUMN, n=st.integers(1, 8))
def test_parquet_lists_of_any_column_type_read_or_refuse_in_one_line(tmp_path_factory, url_type, caption_type, n):
    def column(t):
        sample = {"string": "http://a.test/x.jpg", "large_string": "http://a.test/y.jpg", "int64": 7, "double": 1.5,
                  "binary": b"http://a.test/z.jpg", "null": None}
        if pa.types.is_list(t):
            return pa.array([["http://a.test/l.jpg"]] * n, t)
        if pa.types.is_struct(t):
            return pa.array([{"u": "http://a.test/s.jpg"}] * n, t)
        return pa.array([sample[str(t)]] * n, t)

    path = tmp_path_factory.mktemp("fuzz") / "rows.parquet"
    pq.write_table(pa.table({"url": column(url_type), "caption": column(caption_type)}), path)
    try:
        df = read_url_list(str(path))
    except InputError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    _one_status_per_row(df, n)

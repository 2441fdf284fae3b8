import gzip
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from psdclip.core.errors import InputError
from psdclip.pipeline.parts import file_sha256
from psdclip.pipeline.read import detect_format, read_url_list


def test_formats_give_the_same_rows(tmp_path):
    rows = [{"url": "http://a.test/1.jpg", "caption": "one, with comma"}, {"url": "http://b.test/2.jpg", "caption": "zwei"}]
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "l.csv", index=False)
    df.to_csv(tmp_path / "l.tsv", sep="\t", index=False)
    df.to_parquet(tmp_path / "l.parquet")
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "l.csv.gz", "wt") as f:
        df.to_csv(f, index=False)
    for name in ("l.csv", "l.tsv", "l.parquet", "l.jsonl", "l.csv.gz"):
        out = read_url_list(str(tmp_path / name))
        assert out["url"].tolist() == df["url"].tolist(), name
        assert out["caption"].tolist() == df["caption"].tolist(), name
        assert out["source_row"].tolist() == [0, 1]
        assert (out["source"] == str(tmp_path / name)).all()


def test_txt_has_urls_and_no_captions(tmp_path):
    (tmp_path / "u.txt").write_text("http://a.test/1.jpg\n\nhttp://b.test/2.jpg\n")
    out = read_url_list(str(tmp_path / "u.txt"))
    assert out["url"].tolist() == ["http://a.test/1.jpg", "", "http://b.test/2.jpg"]
    assert (out["caption"] == "").all()


def test_custom_columns_and_fsspec_memory_path():
    import fsspec

    with fsspec.open("memory://lists/x.csv", "w") as f:
        f.write("link,alt\nhttp://a.test/1.jpg,hello\n")
    out = read_url_list("memory://lists/x.csv", url_col="link", caption_col="alt")
    assert out.loc[0, "url"] == "http://a.test/1.jpg" and out.loc[0, "caption"] == "hello"


def test_content_hash_identifies_a_file(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption\nhttp://a.test/1.jpg,x\n")
    (tmp_path / "b.csv").write_text("url,caption\nhttp://a.test/1.jpg,x\n")
    import gzip

    (tmp_path / "c.csv.gz").write_bytes(gzip.compress((tmp_path / "a.csv").read_bytes()))  # decompressed bytes count
    (tmp_path / "d.csv").write_text("url,caption\nhttp://a.test/2.jpg,x\n")
    digests = [file_sha256(str(tmp_path / n)) for n in ("a.csv", "b.csv", "c.csv.gz", "d.csv")]
    assert digests[0] == digests[1] == digests[2] != digests[3]
    assert file_sha256(str(tmp_path / "missing.csv")) is None


@pytest.mark.parametrize("name,content,expect", [
    ("nocol.csv", "link,caption\nhttp://a.test/x.jpg,c\n", r"nocol\.csv: no column 'url'"),
    ("nocap.parquet", None, r"nocap\.parquet: no column 'caption'"),
    ("bad.csv", "url,caption\nhttp://a.test/1.jpg,a\nhttp://a.test/2.jpg,b,c,d\n", r"bad\.csv:3: malformed CSV"),
    ("bad.jsonl", '{"url": "http://a.test/1.jpg", "caption": "a"}\n{"url": broken\n', r"bad\.jsonl:2: malformed JSON"),
    ("bin.csv", b"url,caption\n\xff\xfe\x00garbage\n", r"bin\.csv:2: not UTF-8"),
    ("list.weird", "x", r"cannot tell the input format"),
    ("missing.csv", None, r"missing\.csv: no such file"),
    ("notparquet.parquet", "url,caption\n", r"not a readable Parquet file"),
])
def test_bad_inputs_fail_with_one_line_naming_the_file(tmp_path, name, content, expect):
    path = tmp_path / name
    if name == "nocap.parquet":
        pq.write_table(pa.table({"url": ["http://a.test/x.jpg"]}), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=expect) as info:
        read_url_list(str(path))
    assert "\n" not in str(info.value)


def test_empty_files_have_no_rows(tmp_path):
    for name in ("e.csv", "e.jsonl", "e.txt", "e.tsv"):
        (tmp_path / name).write_text("")
        assert len(read_url_list(str(tmp_path / name))) == 0


def test_detect_format():
    assert detect_format("a/b.CSV.gz") == "csv"
    assert detect_format("s3://x/y.ndjson") == "jsonl"
    assert detect_format("x.unknown", "tsv") == "tsv"


@pytest.mark.parametrize("kind", ["list<string>", "struct", "binary"])
def test_a_parquet_list_whose_url_or_caption_column_is_no_text_is_one_line(tmp_path, kind):
    values = {"list<string>": pa.array([["http://a.test/1.jpg"]]), "struct": pa.array([{"u": "http://a.test/1.jpg"}]),
              "binary": pa.array([b"http://a.test/1.jpg"], pa.binary())}[kind]
    for column in ("url", "caption"):
        table = {"url": pa.array(["http://a.test/1.jpg"]), "caption": pa.array(["x"])}
        table[column] = values
        pq.write_table(pa.table(table), tmp_path / f"{column}.parquet")
        with pytest.raises(InputError, match=rf"column '{column}' holds .*not text") as info:
            read_url_list(str(tmp_path / f"{column}.parquet"))
        assert "\n" not in str(info.value)


def test_odd_json_rows_are_rows_with_a_status_never_the_lists_end(tmp_path):
    """A JSON line whose URL holds a lone surrogate (a "\\ud800" escape), an object or an array as the URL, and a
    line nested past what Python parses: each row is read (its URL refused by name later), or the file is one line."""
    from psdclip.core.urls import url_problem

    lines = [json.dumps({"url": "http://a.test/ok.jpg", "caption": "fine"}),
             '{"url": "http://a.test/\\ud800.jpg", "caption": "surrogate \\udfff in the caption"}',
             json.dumps({"url": {"href": "http://a.test/x.jpg"}, "caption": "an object"}),
             json.dumps({"url": ["http://a.test/x.jpg"], "caption": "an array"})]
    (tmp_path / "odd.jsonl").write_text("\n".join(lines) + "\n")
    df = read_url_list(str(tmp_path / "odd.jsonl"))
    pa.Table.from_pandas(df)  # every value is text Arrow can hold (the build's stages exchange Arrow)
    problems = [url_problem(u) for u in df["url"]]
    assert problems[0] is None
    assert problems[1].startswith("not valid UTF-8") and problems[2] == problems[3] == "empty URL"
    assert df["caption"][1] == "surrogate ? in the caption"
    deep = '{"url": "http://a.test/d.jpg", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    (tmp_path / "deep.jsonl").write_text(lines[0] + "\n" + deep)
    with pytest.raises(InputError, match=r"deep\.jsonl:2: .*nested too deeply|deep\.jsonl:2: malformed") as info:
        read_url_list(str(tmp_path / "deep.jsonl"))
    assert "\n" not in str(info.value)

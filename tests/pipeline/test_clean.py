import pandas as pd

from psdclip.pipeline.clean import check_urls, clean_partition, filter_captions, fix_captions, start


def frame(urls, captions=None):
    captions = captions if captions is not None else ["a caption"] * len(urls)
    return start(pd.DataFrame({"url": urls, "caption": captions, "source": "s", "source_row": range(len(urls))}))


def test_ftfy_repairs_mojibake_entities_and_whitespace():
    df = fix_captions(frame(["http://a.test/1"] * 4, ["cafÃ©  au lait", "fish &amp; chips", "  tabs\there \n",
                                                        "plain ascii"]))
    assert df["caption"].tolist() == ["café au lait", "fish & chips", "tabs here", "plain ascii"]


def test_caption_filters_mark_not_drop():
    df = filter_captions(frame(["http://a.test/1"] * 3, ["", "x" * 11, "fine"]), max_length=10)
    assert df["status"].tolist() == ["empty_caption", "caption_too_long", "pending"]


def test_only_http_and_https_are_fetched():
    urls = ["http://a.test/1.jpg", "HTTPS://B.test/2.jpg", "file:///etc/passwd", "ftp://a.test/x", "data:image/png;base64,xx",
            "javascript:alert(1)", "/relative/path.jpg", "", "http:///nohost", "http://a.test/with space.jpg"]
    df = check_urls(frame(urls))
    assert df["status"].tolist() == ["pending", "pending"] + ["invalid_url"] * 8
    assert "scheme file" in df.loc[2, "error"]
    assert df.loc[7, "error"] == "empty URL"
    assert df["host"].tolist()[:2] == ["a.test", "b.test"]


def test_unicode_urls_are_percent_encoded():
    df = check_urls(frame(["http://bücher.test/ünï code.jpg?q=é"]))
    assert df.loc[0, "status"] == "pending"
    assert df.loc[0, "url"] == "http://xn--bcher-kva.test/%C3%BCn%C3%AF%20code.jpg?q=%C3%A9"
    assert df.loc[0, "host"] == "xn--bcher-kva.test"


def test_first_status_wins():
    df = clean_partition(frame(["file:///x", "http://a.test/1"], ["", ""]).drop(columns=["status", "error"]), 100)
    assert df["status"].tolist() == ["invalid_url", "empty_caption"]

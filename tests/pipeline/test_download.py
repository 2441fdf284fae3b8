import io

import pytest
from helpers.servers import bomb_png, jpeg_bytes

from psdclip.pipeline.download import _guarded_resizer_class, classify


@pytest.mark.parametrize("stage,message,status", [
    ("download", "HTTP Error 404: Not Found", "http_4xx"),
    ("download", "HTTP Error 503: Service Unavailable", "http_5xx"),
    ("download", "HTTP Error 429: Too Many Requests", "rate_limited"),
    ("download", "HTTP Error 302: Found - Redirection to url 'file:///etc/passwd' is not allowed", "redirect_refused"),
    ("download", "The read operation timed out", "timeout"),
    ("download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("download", "Use of image disallowed by X-Robots-Tag directive", "opt_out"),
    ("download", "something new", "download_error"),
    ("resize", "Image decoding error", "not_image"),
    ("resize", "image area too large (100000x100000 declared)", "image_too_large"),
    ("resize", "truncated image (JPEG has no end marker)", "truncated_image"),
    ("resize", "cv2 exploded", "resize_error"),
])
def test_classify(stage, message, status):
    assert classify(stage, message) == status


@pytest.fixture()
def resizer():
    return _guarded_resizer_class()(image_size=32, resize_mode="border", resize_only_if_bigger=False,
                                    upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=90,
                                    encode_format="jpg", skip_reencode=False, disable_all_reencoding=False,
                                    min_image_size=0, max_image_area=10_000_000, max_aspect_ratio=float("inf"))


def test_guarded_resizer(resizer):
    ok = resizer(io.BytesIO(jpeg_bytes()))
    assert ok[-1] is None and ok[1:5] == (32, 32, 48, 48)
    assert "too large" in resizer(io.BytesIO(bomb_png()))[-1]
    assert "too large" in resizer(io.BytesIO(bomb_png(4000, 4000)))[-1]  # under PIL's own limit, over ours
    assert "truncated" in resizer(io.BytesIO(jpeg_bytes()[: len(jpeg_bytes()) // 2]))[-1]
    assert "not an image" in resizer(io.BytesIO(b"<html>hi</html>"))[-1]

"""Local images (`--local-root`): a real folder tree with sidecar captions and a caption file, a list of local paths,
and a hostile folder (symlinks out of the root, `..` and absolute paths, a FIFO, a decompression bomb, a truncated
file, text named .jpg, an unreadable file) go through the real pipeline; every row ends with one status and no byte
outside the root is read. The dataset trains."""
import io
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pandas as pd
from PIL import Image

from helpers.cli import cli
from helpers.datasets import cfg

from psdclip.core.local import read, resolve
from psdclip.pipeline.build import build


def _jpg(path, seed, size=40):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")


def _bomb_png(path, side=30_000):
    """A valid PNG whose header declares side x side pixels (900 Mpx) with a few bytes of data."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    open(path, "wb").write(bytes(data))


def _tree(tmp_path):
    root = tmp_path / "root"
    photos = root / "photos"
    outside = tmp_path / "outside"
    outside.mkdir()
    _jpg(outside / "secret.jpg", 99)
    (outside / "secret.txt").write_text("a secret caption")
    for k in range(6):  # sidecar captions
        _jpg(photos / f"d{k % 2}" / f"img{k}.jpg", k)
        (photos / f"d{k % 2}" / f"img{k}.txt").write_text(f"a photo number {k}\n")
    for k in range(6, 9):  # captions from the caption file
        _jpg(photos / "c" / f"img{k}.jpg", k)
    pd.DataFrame({"path": [f"c/img{k}.jpg" for k in range(6, 9)],
                  "caption": [f"caption file says {k}" for k in range(6, 9)]}).to_csv(photos / "captions.csv",
                                                                                     index=False)
    _jpg(photos / "nocaption.jpg", 20)
    os.symlink(outside / "secret.jpg", photos / "evil.jpg")  # a link out of the root
    os.symlink(outside / "secret.txt", photos / "linked-caption.txt")
    _jpg(photos / "linked-caption.jpg", 21)  # its sidecar leads out of the root: not read
    os.symlink(outside, photos / "linkdir")  # a folder link: not walked
    os.symlink(photos / "d0" / "img0.jpg", photos / "inside-link.jpg")  # a link that stays inside: fine
    os.mkfifo(photos / "pipe.jpg")
    _bomb_png(photos / "bomb.png")
    data = open(photos / "d0" / "img0.jpg", "rb").read()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (photos / "text.jpg").write_text("this is not an image")
    for name in ("pipe.jpg", "bomb.png", "truncated.jpg", "text.jpg", "evil.jpg", "inside-link.jpg"):
        open(str(photos / name).rsplit(".", 1)[0] + ".txt", "w").write(f"caption of {name}")
    return root, photos, outside


def test_a_hostile_folder_tree_ends_every_row_and_reads_nothing_outside(tmp_path):
    root, photos, outside = _tree(tmp_path)
    # no byte of the outside files may be read: their access times are set in the past, and a read would move them
    # (where this file system updates access times: a probe file set up the same way and read tells)
    past = time.time() - 10 * 86400
    probe = outside / "probe.txt"
    probe.write_text("x")
    os.utime(probe, (past, time.time()))
    open(probe).read()
    atimes_tell = os.stat(probe).st_atime >= past + 1
    for f in ("secret.jpg", "secret.txt"):
        os.utime(outside / f, (past, time.time()))
    ds = tmp_path / "ds"
    stats = build(cfg([photos], ds, local_root=str(root), subsets=["1.0"]))
    m = pd.read_parquet(ds / "manifest")
    names = m["url"].map(lambda u: u.rsplit("/", 1)[-1])
    status = dict(zip(names, m["status"]))
    assert len(m) == 9 + 4 + 4, m[["url", "status"]]  # every image file listed is one row (the link inside too)
    for k in range(1, 9):
        assert status[f"img{k}.jpg"] == "success"
    # the link that stays inside resolves to its target: the same file, the same URL; the first listed (the link,
    # in the folder's top level) is downloaded, the target's own row is duplicate_url
    assert sorted(m[names == "img0.jpg"]["status"]) == ["duplicate_url", "success"]
    assert status["evil.jpg"] == "invalid_url"
    assert status["pipe.jpg"] == "not_a_file"
    assert status["bomb.png"] == "image_too_large"
    assert status["truncated.jpg"] == "truncated_image"
    assert status["text.jpg"] == "not_image"
    assert status["nocaption.jpg"] == "empty_caption"
    assert status["linked-caption.jpg"] == "empty_caption"  # its sidecar was not read
    evil = m[m["url"].str.endswith("evil.jpg")].iloc[0]
    assert "outside --local-root" in evil["error"] and "symlink" in evil["error"]
    ok = m[m["status"] == "success"]
    caps = dict(zip(ok["url"].map(lambda u: u.rsplit("/", 1)[-1]), ok["caption"]))
    assert caps["img3.jpg"] == "a photo number 3" and caps["img7.jpg"] == "caption file says 7"
    assert all(u.startswith("file://" + str(root.resolve())) for u in ok["url"])
    assert "a secret caption" not in set(m["caption"].astype(str))
    for f in ("secret.jpg", "secret.txt"):
        assert not atimes_tell or os.stat(outside / f).st_atime < past + 1, f"{f} was read"
    assert stats["success"] == 9
    # a rerun on the same folder has nothing new; a new image is added, the others stay as they were
    _jpg(photos / "d1" / "new.jpg", 50)
    (photos / "d1" / "new.txt").write_text("a new photo")
    build(cfg([photos], ds, local_root=str(root), subsets=["1.0"]))
    m2 = pd.read_parquet(ds / "manifest")
    assert (m2["status"] == "success").sum() == (m["status"] == "success").sum() + 1
    new = m2[m2["url"].str.endswith("/new.jpg")]
    assert list(new["status"]) == ["success"] and list(new["caption"]) == ["a new photo"]
    # the dataset trains
    r = cli("train", "--data", ds, "--out", tmp_path / "run", "--model", "rn-small", "--batch-size", 4, "--steps", 3,
            "--workers", 0, "--no-progress")
    assert "trained 3 steps" in r.stdout


def test_a_list_of_local_paths_and_the_refusals(tmp_path):
    root, photos, outside = _tree(tmp_path)
    lst = tmp_path / "list.csv"
    pd.DataFrame({"url": ["photos/d0/img0.jpg", f"file://{photos}/d1/img1.jpg", "../outside/secret.jpg",
                          str(outside / "secret.jpg"), "photos/../../outside/secret.jpg", "photos/missing.jpg",
                          "http://127.0.0.1:9/x.jpg"],
                  "caption": ["a", "b", "c", "d", "e", "f", "g"]}).to_csv(lst, index=False)
    build(cfg([lst], tmp_path / "ds", local_root=str(root), timeout=1.0))
    m = pd.read_parquet(tmp_path / "ds" / "manifest").set_index("caption")
    assert m.loc["a", "status"] == m.loc["b", "status"] == "success"
    for c in ("c", "d", "e"):
        assert m.loc[c, "status"] == "invalid_url" and "outside --local-root" in m.loc[c, "error"], c
    assert m.loc["f", "status"] == "file_not_found"
    assert m.loc["g", "status"] == "connection_error"  # web rows beside local ones go to the web as always
    # without --local-root a local path or file:// URL stays invalid_url, and a folder input is refused
    build(cfg([lst], tmp_path / "web"))
    assert set(pd.read_parquet(tmp_path / "web" / "manifest")["status"]) == {"invalid_url", "connection_error"}
    r = cli("data", "build", photos, "--out", tmp_path / "x", check=False)
    assert r.returncode == 2 and "a folder; give --local-root" in r.stderr


def test_reading_refuses_what_it_must_not_read(tmp_path):
    root, photos, outside = _tree(tmp_path)
    assert read("photos/pipe.jpg", str(root))[1].startswith("not a regular file (a FIFO)")
    assert read("/dev/zero", "/dev")[1].startswith("not a regular file (a device)")
    assert read("photos/evil.jpg", str(root))[1].startswith("outside --local-root")
    assert read("photos", str(root))[1].startswith("not a regular file (a directory)")
    assert resolve("file://example.com/x.jpg", str(root))[1].startswith("file URL names a host")
    data, err = read("photos/d0/img0.jpg", str(root))
    assert err is None and data.getvalue() == open(photos / "d0" / "img0.jpg", "rb").read()
    # a file its reader may not open (as another user than root, who may open anything)
    os.chmod(photos / "d1" / "img1.jpg", 0)
    os.chmod(root, 0o755)
    code = (f"import os; os.setgid(65534); os.setuid(65534)\nfrom psdclip.core.local import read\n"
            f"print(read('photos/d1/img1.jpg', {str(root)!r})[1])")
    if os.geteuid() == 0:
        for p in (tmp_path, root, photos, photos / "d1"):
            os.chmod(p, 0o755)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-1000:]
        assert r.stdout.startswith("permission denied")
    else:
        assert read("photos/d1/img1.jpg", str(root))[1].startswith("permission denied")
    from psdclip.pipeline.download import classify

    assert classify("download", "permission denied: the file cannot be read") == "file_unreadable"
    assert classify("download", "not a regular file (a FIFO): never read") == "not_a_file"

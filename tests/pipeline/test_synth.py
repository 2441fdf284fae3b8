import hashlib
import os

import pandas as pd
import pytest

from psdclip.pipeline.config import SynthConfig
from psdclip.pipeline.synth import SHIFTS, generate


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith((".jpg", ".csv")):
                h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def test_deterministic_from_the_seed(tmp_path):
    a = SynthConfig(out=str(tmp_path / "a"), n=40, seed=5, heldout=3, image_size=32)
    b = SynthConfig(out=str(tmp_path / "b"), n=40, seed=5, heldout=3, image_size=32)
    c = SynthConfig(out=str(tmp_path / "c"), n=40, seed=6, heldout=3, image_size=32)
    for cfg in (a, b, c):
        generate(cfg, progress=False)
    assert digest(a.out) == digest(b.out) != digest(c.out)


def test_noise_kinds_and_ground_truth(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), n=2000, seed=0, heldout=4, image_size=32, mismatch_frac=0.2, shared_frac=0.1,
                      lowinfo_frac=0.05, partial_frac=0.3)
    generate(cfg, progress=False)
    attrs = pd.read_parquet(tmp_path / "attributes.parquet")
    share = attrs["caption_kind"].value_counts(normalize=True)
    assert abs(share["mismatch"] - 0.2) < 0.03 and abs(share["shared"] - 0.1) < 0.03
    assert abs(share["lowinfo"] - 0.05) < 0.02 and share["partial"] > 0.15
    # many images share one caption
    assert attrs.loc[attrs["caption_kind"] == "shared", "caption"].value_counts().max() >= 10
    # a clean caption names the scene's colour; a mismatched one is another scene's
    clean = attrs[attrs["caption_kind"] == "clean"]
    from psdclip.pipeline.synth import COLOUR_WORDS
    names = clean.apply(lambda r: any(w in r["caption"] for w in COLOUR_WORDS[r["colour"]]), axis=1)
    assert names.mean() > 0.95
    for variant in SHIFTS:
        assert len(os.listdir(tmp_path / "heldout" / variant)) == 4
    urls = pd.read_csv(tmp_path / "urls.csv")
    assert len(urls) == 2000 and urls["url"].str.startswith("http://127.0.0.1:").all()


def _folder_with_a_free_stable_port(tmp_path):
    """A folder whose stable port nothing holds now (another process on this machine may hold any one port)."""
    import socket

    from psdclip.pipeline.serve import STABLE_PORTS, stable_port

    for i in range(50):
        folder = tmp_path / f"src{i}"
        port = stable_port(str(folder))
        assert STABLE_PORTS[0] <= port < STABLE_PORTS[1] <= 32768  # below Linux's range for outgoing connections
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        folder.mkdir()
        return folder
    raise AssertionError("50 stable ports in a row are taken")


def test_serving_uses_a_stable_port_so_reruns_see_the_same_urls(tmp_path):
    import urllib.request

    from psdclip.core.errors import PsdclipError
    from psdclip.pipeline.serve import serving, stable_port
    from psdclip.pipeline.synth import write_url_list

    folder = _folder_with_a_free_stable_port(tmp_path)
    (folder / "x.txt").write_text("hello")
    pd.DataFrame({"path": ["x.txt"], "caption": ["a file"]}).to_parquet(folder / "attributes.parquet")
    listed = str(folder / "urls-run.csv")
    with serving(str(folder), again=listed) as first:  # no earlier list: the stable port
        assert first.endswith(f":{stable_port(str(folder))}")
        assert urllib.request.urlopen(first + "/x.txt").read() == b"hello"
        with serving(str(folder)) as second:  # the stable port is taken: any free port
            assert second != first
            assert urllib.request.urlopen(second + "/x.txt").read() == b"hello"
            write_url_list(str(folder), second, "urls-run.csv")  # a run that had to take another port
            # a rerun serves on the port its earlier list points at, whatever the stable port, or says it cannot
            with pytest.raises(PsdclipError, match=f"{second.rsplit(':', 1)[1]}, where the URLs of .*urls-run.csv"):
                with serving(str(folder), again=listed):
                    pass
    with serving(str(folder), again=listed) as again:
        assert again == second  # the earlier run's URLs, served again
        assert pd.read_csv(listed)["url"].tolist() == [again + "/x.txt"]
    with serving(str(folder)) as plain:
        assert plain == first

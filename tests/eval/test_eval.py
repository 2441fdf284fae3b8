"""psdclip eval and compare, end to end on a tiny checkpoint trained on a pipeline-built dataset."""
import json
import os

import numpy as np
from PIL import Image

from helpers.cli import cli
from helpers.datasets import image, make_objectnet


def test_synthetic_suite_end_to_end(runs, synth_dir):
    r = cli("eval", runs[0], "--suite", f"synthetic:{synth_dir}", "--json", "--workers", 0)
    res = json.loads(r.stdout)
    m = res["metrics"]
    for key in ("zeroshot_shape_base.top1", "zeroshot_shape_sketch.top1", "linear_probe_shape.accuracy",
                "retrieval.i2t_R@1", "retrieval.t2i_R@10", "robustness.noise"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["zeroshot_shape_base.top5"] >= m["zeroshot_shape_base.top1"]
    saved = json.load(open(runs[0] / "eval" / "synthetic.json"))
    assert len(saved["examples"]["zeroshot_shape_base.top1"]) == 40  # the 40 held-out scenes
    for key, values in saved["examples"].items():  # each per-example array is named as the metric it averages
        assert np.isclose(np.mean(values), m[key]), key
    assert {"retrieval.i2t_R@1", "retrieval.t2i_R@1", "linear_probe_shape.accuracy"} <= set(saved["examples"])
    assert list((runs[0] / "eval" / "cache").glob("*.npz"))  # features cached for the next metric/eval
    again = json.loads(cli("eval", runs[0], "--suite", f"synthetic:{synth_dir}", "--json", "--workers", 0).stdout)
    assert again["metrics"] == m


def test_compare_with_bootstrap_and_effective_robustness(runs, synth_dir, tmp_path):
    for run in runs[1:]:
        cli("eval", run, "--suite", f"synthetic:{synth_dir}", "--workers", 0)
    r = cli("compare", runs[0], runs[1], "--reference", f"{runs[0]},{runs[2]}", "--out", tmp_path)
    assert "zeroshot_shape_base.top1" in r.stdout and "effective robustness" in r.stdout
    res = json.load(open(tmp_path / "compare.json"))
    row = next(x for x in res["rows"] if x["metric"] == "zeroshot_shape_base.top1")
    d = row["diff"][str(runs[1])]
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert set(res["effective_robustness"][str(runs[1])]) == {"sketch", "texture", "colorshift", "blur", "noise"}
    assert (tmp_path / "compare.png").stat().st_size > 1000
    # an evaluation written before per-example arrays were named as their metric still pairs by example
    old = json.load(open(runs[1] / "eval" / "synthetic.json"))
    old["examples"] = {k.replace("i2t_R@1", "i2t_r1").replace("shape.accuracy", "shape.correct"): v
                       for k, v in old["examples"].items()}
    (tmp_path / "legacy" / "eval").mkdir(parents=True)
    (tmp_path / "legacy" / "eval" / "synthetic.json").write_text(json.dumps(old))
    cli("compare", runs[0], tmp_path / "legacy", "--out", tmp_path / "cmp-legacy")
    rows = {x["metric"]: x for x in json.load(open(tmp_path / "cmp-legacy" / "compare.json"))["rows"]}
    for metric in ("retrieval.i2t_R@1", "linear_probe_shape.accuracy"):
        assert "ci_low" in rows[metric]["diff"][str(tmp_path / "legacy")], metric


def _folder(root, classes, per_class=6, bad=0):
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for k in range(per_class):
            arr = np.full((40, 40, 3), (i * 80) % 255, np.uint8) + rng.integers(0, 30, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{k}.jpg")
        for k in range(bad):
            (root / c / f"broken{k}.jpg").write_bytes(b"not a jpeg")


def test_imagefolder_and_retrieval_suites_and_their_bad_inputs(runs, tmp_path):
    folder = tmp_path / "folder"
    _folder(folder, ["red_thing", "blue_thing", "green_thing"], bad=1)
    res = json.loads(cli("eval", runs[0], "--suite", f"imagefolder:{folder}", "--json", "--workers", 0).stdout)
    assert res["metrics"]["skipped_images"] == 3 and 0 <= res["metrics"]["zeroshot.top1"] <= 1
    assert "linear_probe.accuracy" in res["metrics"]
    # classnames.txt written in another order than the sorted folders is paired by name, not by position
    (folder / "classnames.txt").write_text("green thing\nblue thing\nred thing\n")
    named = json.loads(cli("eval", runs[0], "--suite", f"imagefolder:{folder}", "--json", "--workers", 0).stdout)
    assert named["metrics"]["zeroshot.top1"] == res["metrics"]["zeroshot.top1"]
    assert "by name" in named["metrics"]["class_names"]
    rows = [{"image": f"folder/red_thing/{k}.jpg", "captions": ["a red thing", "something red"]} for k in range(4)]
    (tmp_path / "ret.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = json.loads(cli("eval", runs[0], "--suite", f"retrieval:{tmp_path / 'ret.jsonl'}", "--json",
                             "--workers", 0).stdout)
    assert res["metrics"]["retrieval.captions"] == 8 and res["metrics"]["retrieval.i2t_R@10"] == 1.0
    # bad inputs: one line each
    (folder / "classnames.txt").write_text("red\nblue\n")
    empty = tmp_path / "empty"
    _folder(empty, ["a", "b"])
    os.makedirs(empty / "c")
    (tmp_path / "ret-missing.csv").write_text("image,caption\nnope.jpg,hello\n")
    cases = [
        (f"imagefolder:{folder}", "2 class names for 3 class folders"),
        (f"imagefolder:{empty}", "empty class folder"),
        (f"retrieval:{tmp_path / 'ret-missing.csv'}", "1 image(s) not found"),
        (f"synthetic:{tmp_path}", "no held-out scenes"),
        ("nonsense", "--suite 'nonsense'"),
    ]
    for suite, expect in cases:
        r = cli("eval", runs[0], "--suite", suite, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
        assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], (suite, r.stderr[-1500:])
    # a cache whose features do not fit the checkpoint
    cache = next((runs[0] / "eval" / "cache").glob("imagefolder-*.npz"))
    data = dict(np.load(cache))
    data["images.f"] = np.zeros((18, 7), np.float32)
    np.savez(cache, **data)
    (folder / "classnames.txt").unlink()
    r = cli("eval", runs[0], "--suite", f"imagefolder:{folder}", check=False)
    assert r.returncode == 2 and "cached features have 7 dimensions" in r.stderr


def test_imagenet_suite_on_a_subset_and_on_objectnet(runs, tmp_path):
    from psdclip.eval.imagenet import imagenet_wnids

    wnids = imagenet_wnids()
    sub = tmp_path / "imagenet-r"
    for w in (wnids[1], wnids[409], wnids[999]):
        for k in range(3):
            image(sub / w / f"{k}.jpg")
    res = json.loads(cli("eval", runs[0], "--suite", f"imagenet:{sub}", "--json", "--workers", 0).stdout)
    m = res["metrics"]
    assert m["variant"] == "imagenet-subset-3"
    assert m["classes"] == 3 and m["skipped_images"] == 0 and 0 <= m["zeroshot.top1"] <= m["zeroshot.top5"] == 1.0
    obj = make_objectnet(tmp_path / "objectnet-1.0")
    res = json.loads(cli("eval", runs[0], "--suite", f"imagenet:{obj}", "--json", "--workers", 0).stdout)
    assert res["metrics"]["variant"] == "objectnet" and res["metrics"]["classes"] == 2
    assert (runs[0] / "eval" / "imagenet-imagenet-r.json").is_file()  # each data set keeps its own result
    saved = json.load(open(runs[0] / "eval" / "imagenet-objectnet-1.0.json"))
    assert len(saved["examples"]["zeroshot.top1"]) == 4  # alarm_clock + banana images; air_freshener is not in 1k
    r = cli("eval", runs[0], "--suite", f"imagenet:{tmp_path}", check=False)  # folders that are not classes
    assert r.returncode == 2 and r.stderr.count("psdclip: error") == 1 and "not a WordNet id" in r.stderr


def test_mean_per_class_recall_by_hand():
    from psdclip.eval.evaluate import _zero_shot

    # class 0: 3 examples, 2 right; class 1: 1 example, right; class 2: no example (not counted)
    logits = np.array([[5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 5, 0]], dtype=float)
    values, _ = _zero_shot(logits, np.array([0, 0, 0, 1]))
    assert values["top1"] == 0.75 and abs(values["mean_per_class_recall"] - (2 / 3 + 1) / 2) < 1e-12


def test_clip_benchmark_records(runs, synth_dir, tmp_path):
    """`--format clip_benchmark` writes CLIP_benchmark's result JSON (its documented keys), one file per dataset and
    task, with the same values as psdclip's own result."""
    r = cli("eval", runs[0], "--suite", f"synthetic:{synth_dir}", "--format", "clip_benchmark", "--workers", 0)
    assert "CLIP_benchmark records:" in r.stdout
    ours = json.load(open(runs[0] / "eval" / "synthetic.json"))["metrics"]
    folder = runs[0] / "eval" / "clip_benchmark"
    records = {p.name: json.load(open(p)) for p in folder.glob("*.json")}
    assert "synthetic_zeroshot_shape_base_zeroshot_classification.json" in records
    assert "synthetic_zeroshot_retrieval.json" in records
    for rec in records.values():
        assert set(rec) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert rec["language"] == "en" and rec["model"] == "psdclip-tiny"
        assert rec["task"] in ("zeroshot_classification", "zeroshot_retrieval")
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in rec["metrics"].values())
    cls = records["synthetic_zeroshot_shape_base_zeroshot_classification.json"]["metrics"]
    assert cls == {"acc1": ours["zeroshot_shape_base.top1"], "acc5": ours["zeroshot_shape_base.top5"],
                   "mean_per_class_recall": ours["zeroshot_shape_base.mean_per_class_recall"]}
    ret = records["synthetic_zeroshot_retrieval.json"]["metrics"]
    assert ret["image_retrieval_recall@5"] == ours["retrieval.t2i_R@5"]
    assert ret["text_retrieval_recall@1"] == ours["retrieval.i2t_R@1"]


def test_clip_benchmark_wds_layout(runs, tmp_path):
    """CLIP_benchmark's local webdataset layout (test/*.tar with webp + cls + txt, classnames.txt,
    zeroshot_classification_templates.txt) is read from disk and evaluated like an image folder of those classes."""
    import io
    import tarfile

    root = tmp_path / "wds_toy"
    (root / "test").mkdir(parents=True)
    # the class names in the folder suite's (sorted) order and its templates: the same classifier, to the bit
    names = ["blue square", "green star", "red circle"]
    (root / "classnames.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    colours = [(30, 30, 220), (30, 200, 30), (220, 30, 30)]
    folder = tmp_path / "as-folder"
    folder.mkdir()
    (folder / "templates.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(12):
            buf = io.BytesIO()
            im = Image.new("RGB", (64, 64), colours[i % 3])
            im.save(buf, "WEBP", lossless=True)  # the same pixels as the png: the same features
            name = names[i % 3]
            (folder / name).mkdir(parents=True, exist_ok=True)
            im.save(folder / name / f"{i:04d}.png")
            for ext, data in (("webp", buf.getvalue()), ("cls", str(i % 3).encode()),
                              ("txt", f"a {name} number {i}\nsomething {name}".encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    r = cli("eval", runs[0], "--suite", f"wds:{root}", "--json", "--workers", 0, "--format", "clip_benchmark")
    m = json.loads(r.stdout)["metrics"]
    assert {"zeroshot.top1", "zeroshot.mean_per_class_recall", "retrieval.t2i_R@1"} <= set(m)
    assert m["retrieval.images"] == 12 and m["retrieval.captions"] == 24
    # the same images as a folder of classes, with the same class names and templates, give the same zero-shot top-1
    # (lossless webp and png: the same pixels)
    same = json.loads(cli("eval", runs[0], "--suite", f"imagefolder:{folder}", "--json", "--workers", 0).stdout)
    assert abs(same["metrics"]["zeroshot.top1"] - m["zeroshot.top1"]) < 1e-9
    assert (runs[0] / "eval" / "clip_benchmark" / "wds-wds_toy_zeroshot_classification.json").exists()
    bad = cli("eval", runs[0], "--suite", f"wds:{tmp_path / 'as-folder'}", check=False)
    assert bad.returncode == 2 and "no .tar shards" in bad.stderr

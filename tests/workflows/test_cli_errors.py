"""Bad input on any command ends with exit code 2 and one `psdclip: error:` line naming the input, never a
traceback (issue 16's list), and the user's files are left as they were."""
import os
import socket
import subprocess

import pytest
from PIL import Image

from helpers.cli import BIN, cli


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "afile").write_text("mine")
    broken = d / "broken"
    (broken / "_state").mkdir(parents=True)
    (broken / "dataset.json").write_text("{")
    (broken / "manifest.parquet").write_bytes(b"not parquet at all")
    (d / "garbage.csv").write_bytes(b"\x00\x01\x02 not, a\n\"retrieval file")
    (d / "not-yaml.csv").write_text("url,caption\nhttp://x/y.jpg,\"unclosed\n: [\n")
    Image.new("L", (9000, 9000)).save(d / "bomb.png")  # 81 M pixels declared, a few KB on disk
    (d / "sweep-method.yaml").write_text("synthetic: {n: 100}\nsweep: {subsets: ['1.0'], methods: {clip: 3}}\n")
    (d / "sweep-chance.yaml").write_text("synthetic: {n: 100}\nsweep: {subsets: ['1.0'], methods: {clip: {}}, "
                                         "chance: {zeroshot_shape_base.top1: 1.5}}\n")
    (d / "model-list.yaml").write_text("synthetic: {n: 100}\ntrain: {model: [1, 2]}\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "array.jsonl").write_text('{"url": "http://a.test/x.jpg", "caption": "c"}\n["http://a.test/y.jpg", "d"]\n')
    (d / "twice.csv").write_text("url,caption,url\nhttp://a.test/x.jpg,c,http://b.test/y.jpg\n")
    (d / "empty.csv").write_text("")
    (d / "export.pt").write_text("an export of mine")
    (d / "nonimages" / "cats").mkdir(parents=True)
    (d / "nonimages" / "dogs").mkdir()
    for cls in ("cats", "dogs"):
        (d / "nonimages" / cls / "a.jpg").write_text("not an image at all")
    (d / "nan-lr.yaml").write_text("lr: .nan\n")
    return d


CASES = {
    "stats of a damaged manifest": (["data", "stats", "{bad}/broken"], "manifest.parquet: damaged"),
    "build into a damaged dataset.json": (["data", "build", "{bad}/garbage.csv", "--out", "{bad}/broken"],
                                          "dataset.json: damaged"),
    "synth into a file": (["data", "synth", "--out", "{bad}/afile", "--n", "5"], "afile"),
    "build into a file": (["data", "build", "{bad}/garbage.csv", "--out", "{bad}/afile"], "is a file"),
    "build: a folder without --local-root": (["data", "build", "{bad}/nonimages", "--out", "{tmp}/d10"],
                                             "a folder; give --local-root"),
    "build: a --local-root that is not there": (["data", "build", "{bad}/garbage.csv", "--out", "{tmp}/d11",
                                                 "--local-root", "{bad}/nowhere"], "--local-root"),
    "build: a million download threads": (["data", "build", "{bad}/garbage.csv", "--out", "{tmp}/d12",
                                           "--thread-count", "1000000"], "--thread-count 1000000: at most 4096"),
    "build: png at jpg's quality": (["data", "build", "{bad}/garbage.csv", "--out", "{tmp}/d13", "--encode-format",
                                     "png", "--encode-quality", "95"], "must be in [0, 9] for --encode-format png"),
    "train: a bank teacher for CLIP": (["train", "--data", "{ds}", "--out", "{tmp}/t9", "--loss", "clip",
                                        "--bank-teacher"], "use --loss psd"),
    "train: two teachers": (["train", "--data", "{ds}", "--out", "{tmp}/t10", "--bank-teacher", "--ema-teacher"],
                            "different teachers"),
    "emoji: the test vendor is trained on": (["data", "emoji", "--out", "{tmp}/e1", "--test-vendor", "apple"],
                                             "also a training vendor"),
    "index: invalid factory": (["index", "build", "--checkpoint", "{run}", "--data", "{ds}", "--out", "{tmp}/i1",
                                "--factory", "NoSuchIndex,Flat"], "--factory 'NoSuchIndex,Flat'"),
    "index: factory too large for the data": (["index", "build", "--checkpoint", "{run}", "--data", "{ds}", "--out",
                                               "{tmp}/i2", "--factory", "IVF65536,Flat"], "IVF65536"),
    "index: budget too small": (["index", "build", "--checkpoint", "{run}", "--data", "{ds}", "--out", "{tmp}/i3",
                                 "--max-memory", "1KB"], "--max-memory"),
    "index: out is a file": (["index", "build", "--checkpoint", "{run}", "--data", "{ds}", "--out", "{bad}/afile"],
                             "afile"),
    "eval: garbage retrieval file": (["eval", "{run}", "--suite", "retrieval:{bad}/garbage.csv"], "garbage.csv"),
    "query: decompression bomb": (["index", "query", "{index}", "--image", "{bad}/bomb.png"], "bomb.png"),
    "sweep: a method that is not a mapping": (["sweep", "{bad}/sweep-method.yaml", "--check"],
                                              "method 'clip' must be a mapping"),
    "sweep: a chance value outside [0, 1)": (["sweep", "{bad}/sweep-chance.yaml", "--check"], "sweep.chance"),
    "train: an unknown --report-to": (["train", "--data", "{ds}", "--out", "{tmp}/t1", "--report-to", "mlflow"],
                                      "--report-to 'mlflow'"),
    "train: --eval-every without a suite": (["train", "--data", "{ds}", "--out", "{tmp}/t2", "--eval-every", "5"],
                                            "--eval-every N needs"),
    "train: an eval suite of no known kind": (["train", "--data", "{ds}", "--out", "{tmp}/t3", "--eval-every", "5",
                                               "--eval-suite", "coco"], "--suite 'coco'"),
    "train: config that is not YAML": (["train", "--config", "{bad}/not-yaml.csv"], "not-yaml.csv"),
    "run --check: model is a list": (["run", "{bad}/model-list.yaml", "--check"], "model"),
    "data serve on a port in use": (["data", "serve", "{bad}", "--port", "{port}"], "--port {port}: cannot listen"),
    "serve on a port in use": (["serve", "{index}", "--port", "{port}"], "--port {port}: cannot listen"),
    # every float option is finite and in range, checked where options are parsed (issue 30: 13)
    **{f"train: {flag} nan": (["train", "--data", "{ds}", "--out", "{tmp}/n", flag, "nan"],
                              f"{flag}: expected a finite number")
       for flag in ("--lr", "--warmup", "--weight-decay", "--teacher-temperature", "--grad-clip")},
    "train: --lr inf": (["train", "--data", "{ds}", "--out", "{tmp}/n", "--lr", "inf"], "expected a finite number"),
    "train: a NaN in a config file": (["train", "--data", "{ds}", "--out", "{tmp}/n", "--config", "{bad}/nan-lr.yaml"],
                                      "lr: expected a finite number"),
    "train: negative weight decay": (["train", "--data", "{ds}", "--out", "{tmp}/n", "--weight-decay", "-1"],
                                     "--weight-decay"),
    "train: config that is a binary file": (["train", "--config", "{bad}/binary.yaml"], "binary.yaml"),
    "build: a JSON line that is an array": (["data", "build", "{bad}/array.jsonl", "--out", "{tmp}/d1"],
                                            "array.jsonl:2: each JSON line must be an object"),
    "build: a header naming url twice": (["data", "build", "{bad}/twice.csv", "--out", "{tmp}/d2"],
                                         "column 'url' more than once"),
    "build: only an empty list": (["data", "build", "{bad}/empty.csv", "--out", "{tmp}/d3"], "no rows"),
    "export over an existing file": (["export", "{run}", "--out", "{bad}/export.pt"], "pass --force"),
    "export under a file": (["export", "{run}", "--out", "{bad}/afile/model.pt"], "is a file, not a folder"),
    "export to a directory": (["export", "{run}", "--out", "{bad}"], "is a directory"),
    "eval: folders of non-images": (["eval", "{run}", "--suite", "imagefolder:{bad}/nonimages"],
                                    "could be decoded as an image"),
}


@pytest.fixture(scope="module")
def index_small(dataset_dir, runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "idx"
    cli("index", "build", "--checkpoint", runs[0], "--data", dataset_dir, "--out", out, "--no-progress",
        "--workers", 0)
    return out


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, bad, dataset_dir, runs, index_small, busy_port, tmp_path):
    args, expect = CASES[case]
    fill = {"bad": bad, "run": runs[0], "ds": dataset_dir, "tmp": tmp_path, "index": index_small, "port": busy_port}
    expect = expect.format(**fill)
    r = cli(*[a.format(**fill) for a in args], check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("psdclip: error: "), (r.returncode, r.stderr)
    assert expect in lines[0], lines[0]
    assert (bad / "afile").read_text() == "mine" and (bad / "broken" / "dataset.json").read_text() == "{"
    assert (bad / "export.pt").read_text() == "an export of mine"


def test_stats_into_a_closed_pipe(dataset_dir):
    """What a shell does to `psdclip data stats --json | head`: the reader is gone before the output is written
    (`true` exits at once; psdclip writes after its start-up), so the write meets a closed pipe."""
    r = subprocess.run(f"{os.path.join(BIN, 'psdclip')} data stats {dataset_dir} --json | true", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr, \
        r.stderr


def test_one_logging_setup_and_quiet_verbose_flags(capsys):
    """Every module logs under psdclip.*; the CLI's --quiet / --verbose set the level once (children inherit it)."""
    import logging
    import os

    from psdclip.core import logs
    from psdclip.workflows.cli import make_parser

    assert make_parser().parse_args(["-q", "demo"])._log_level == "WARNING"
    assert make_parser().parse_args(["--verbose", "demo"])._log_level == "DEBUG"
    log = logging.getLogger("psdclip.train.loop")
    try:
        logs.setup("WARNING")
        log.info("an info line")
        log.warning("a warning line")
        assert os.environ[logs.ENV] == "WARNING"
    finally:
        logs.setup("INFO")
    log.info("info again")
    err = capsys.readouterr().err
    assert "an info line" not in err and "a warning line\n" in err and "info again\n" in err
    ours = [h for h in logging.getLogger("psdclip").handlers if isinstance(h, logs._Stderr)]
    assert len(ours) == 1  # setup again replaces its handler


def test_the_prompt_exit_ends_a_thread_pool_left_running():
    """`psdclip train --compile` never exited: torch.compile leaves concurrent.futures pool workers (non-daemon
    threads that end only when the pool's exit hook wakes them), and the console script's prompt exit joined every
    non-daemon thread without running that hook first (benchmarks/gpu_check.py's rehearsal found it)."""
    import subprocess
    import sys

    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "import psdclip.workflows.cli as cli\n"
            "pool = ThreadPoolExecutor(2)\n"
            "def main():\n"
            "    pool.submit(print, 'ran in the pool').result()\n"
            "    return 3\n"
            "cli.main = main\n"
            "cli.entry()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "ran in the pool" in r.stdout, r.stderr[-2000:]

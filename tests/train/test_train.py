"""The trainer end to end on a dataset made by the pipeline: it learns, resumes exactly, survives kill -9,
exports to open_clip, and refuses bad input with one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers.cli import BIN, cli

from psdclip.train.models import build_model

FAST = ["--model", "rn-small", "--batch-size", "32", "--workers", "1", "--shuffle-buffer", "64", "--warmup", "3",
        "--no-progress"]


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_model_learns_and_writes_its_run(dataset_dir, synth_dir, tmp_path):
    """The rn-small preset (the studies' model) learns within 60 steps, evaluates while it trains (as `psdclip eval`
    does the checkpoint), reports to TensorBoard, and its export loads in plain open_clip."""
    run = tmp_path / "run"
    cli("train", "--data", dataset_dir, "--out", run, "--steps", 60, "--lr", "2e-3", "--log-every", 4,
        "--checkpoint-every", 20, "--keep", 2, *FAST[2:], "--model", "rn-small", "--eval-every", 30,
        "--eval-suite", f"synthetic:{synth_dir}", "--report-to", "tensorboard")
    evals = [r for r in metrics(run) if "eval" in r]
    assert [r["step"] for r in evals] == [30, 60] and all(r["split"] == "val" for r in evals)
    alone = json.loads(cli("eval", run, "--suite", f"synthetic:{synth_dir}", "--split", "val", "--json",
                           "--workers", 0).stdout)["metrics"]
    for key in ("zeroshot_shape_base.top1", "retrieval.mean_R@1", "zeroshot_colour_base.top1"):
        assert abs(evals[-1]["metrics"][key] - alone[key]) <= 0.1 + 1e-9, key  # 10 val scenes: one may tie apart
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "eval/zeroshot_shape_base.top1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/zeroshot_shape_base.top1")] == [30, 60]
    rows = [r for r in metrics(run) if "eval" not in r]
    first, last = sum(r["loss"] for r in rows[:2]) / 2, sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.3, (first, last)
    assert rows[-1]["alpha"] > rows[0]["alpha"] and 0 <= rows[-1]["data_wait_frac"] <= 1
    assert {"lr", "logit_scale", "samples_per_s", "contrastive_loss"} <= set(rows[-1])
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_000040.pt", "step_000060.pt"]
    assert {"loss.png", "alpha.png", "lr.png", "eval.png"} <= set(os.listdir(run / "plots"))
    assert "loss: psd" in (run / "config.yaml").read_text()
    # the recipe that export prints loads the model in plain open_clip (a fresh process, no psdclip imported)
    # and it encodes like our model
    from psdclip.train.models import build_model

    out = cli("export", run, "--out", tmp_path / "model.pt").stdout
    recipe = out.split("load it with: ", 1)[1].strip()
    ref, _, _, tok = build_model("rn-small")
    ref.load_state_dict(torch.load(run / "checkpoints" / "step_000060.pt", weights_only=True)["model"])
    x, t = torch.randn(2, 3, 48, 48), tok(["a red circle", "two blue squares"])
    torch.save({"x": x, "t": t}, tmp_path / "inputs.pt")
    code = (f"{recipe}\nimport sys, torch\nassert not [m for m in sys.modules if m.split('.')[0] == 'psdclip']\n"
            f"d = torch.load({str(tmp_path / 'inputs.pt')!r}); model.eval()\n"
            f"with torch.no_grad(): torch.save({{'i': model.encode_image(d['x'], normalize=True), "
            f"'t': model.encode_text(d['t'], normalize=True)}}, {str(tmp_path / 'outputs.pt')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "outputs.pt")
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(got["i"], ref.encode_image(x, normalize=True), atol=1e-5)
        assert torch.allclose(got["t"], ref.encode_text(t, normalize=True), atol=1e-5)


def test_stop_and_resume_matches_an_uninterrupted_run(dataset_dir, tmp_path):
    """Model (BatchNorm statistics too), optimizer, data position, each sample's augmentation and the EMA teacher all
    continue where they stopped: the resumed run computes what the uninterrupted one did."""
    common = ["--data", dataset_dir / "subsets" / "100pct.json", "--steps", 12, "--log-every", 1,
              "--checkpoint-every", 100, "--ema-teacher", "--ema-decay", "0.9", *FAST]
    cli("train", "--out", tmp_path / "whole", *common)
    cli("train", "--out", tmp_path / "split", "--stop-after", 6, *common)
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["latest", "step_000006.pt"]
    r = cli("train", "--out", tmp_path / "split", *common)
    assert "resuming from" in r.stderr
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 13))
    for a, b in zip(whole, split):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    wa = torch.load(tmp_path / "whole" / "checkpoints" / "step_000012.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "split" / "checkpoints" / "step_000012.pt", weights_only=True)["model"]
    assert any("running_var" in k for k in wa)
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert diff <= 1e-5, diff
    ta = torch.load(tmp_path / "whole" / "checkpoints" / "step_000012.pt", weights_only=True)["teacher"]
    tb = torch.load(tmp_path / "split" / "checkpoints" / "step_000012.pt", weights_only=True)["teacher"]
    diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    assert diff <= 1e-5, diff  # a teacher restarted from the step-6 student would be ~0.5 x (student - EMA) away
    assert max(float((ta[k].float() - wa[k].float()).abs().max()) for k in ta) > 1e-3  # it is not the student


def test_resume_past_a_damaged_checkpoint_logs_each_step_once(dataset_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--data", dataset_dir, "--out", run, "--log-every", 1, "--checkpoint-every", 4, *FAST]
    # (the same --warmup both times: a resume refuses a changed schedule)
    cli("train", "--steps", 8, *common[:-len(FAST)], *FAST[:-3], "--warmup", 20, "--no-progress")
    (run / "checkpoints" / "step_000008.pt").write_bytes(b"damaged on disk")
    r = cli("train", "--steps", 10, *common[:-len(FAST)], *FAST[:-3], "--warmup", 20, "--no-progress",
            "--workers", 0)
    assert "step_000008.pt: not a loadable checkpoint" in r.stderr and "trying an older checkpoint" in r.stderr
    assert "(step 4)" in r.stderr  # fell back to step 4, so steps 5-8 ran again
    assert "--warmup 20 is 20 steps, more than --steps 10" in r.stderr
    assert "(1 x 1 -> 1 x 0); the data stream restarts its epoch, so the 128 samples" in r.stderr  # 4 steps x 32
    assert "step 10/10  loss" in r.stderr and "samples/s" in r.stderr and "ETA" in r.stderr  # no bar: log lines
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))


@pytest.mark.parametrize("when", ["checkpoint-write", "mid-run"])
def test_kill_9_leaves_a_loadable_checkpoint_and_the_run_resumes(dataset_dir, tmp_path, when):
    run = tmp_path / "run"
    args = ["train", "--data", dataset_dir, "--out", run, "--steps", 16, "--checkpoint-every", 2, "--log-every", 2, *FAST]
    proc = subprocess.Popen([os.path.join(BIN, "psdclip"), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = run / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        steps = [n for n in names if n.endswith(".pt")]
        if when == "checkpoint-write" and any(".tmp-" in n for n in names) and steps:
            break
        if when == "mid-run" and len(steps) >= 2:
            time.sleep(0.3)
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from psdclip.train import checkpoint as ckpt

    for path in ckpt.list_checkpoints(str(ckpts)):  # every complete checkpoint loads
        assert torch.load(path, weights_only=True)["step"] > 0
    r = cli(*args)
    assert "resuming from" in r.stderr
    assert metrics(run)[-1]["step"] == 16
    assert not [n for n in os.listdir(ckpts) if ".tmp-" in n]


def test_two_process_torchrun_training(dataset_dir, tmp_path):
    run = tmp_path / "ddp"
    r = subprocess.run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2",
                        "-m", "psdclip.workflows.cli", "train", "--data", str(dataset_dir), "--out", str(run),
                        "--steps", "4", "--log-every", "2", "--checkpoint-every", "2", *FAST],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "step_000004.pt", weights_only=True)
    assert state["data"]["world_size"] == 2 and len(state["data"]["position"]) == 2
    assert metrics(run)[-1]["step"] == 4


def test_bad_inputs_end_with_one_line(dataset_dir, tmp_path, server):
    from psdclip.pipeline.build import build
    from psdclip.pipeline.config import BuildConfig

    empty_list = tmp_path / "bad.csv"
    empty_list.write_text(f"url,caption\n{server.base}/bad/404.jpg,x\n")
    build(BuildConfig(inputs=[str(empty_list)], out=str(tmp_path / "nothing"), progress=False, processes_count=1))
    (tmp_path / "other.json").write_text(json.dumps({"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 1,
        "width": 64, "patch_size": 16}, "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64,
        "heads": 2, "layers": 1}}))
    good = tmp_path / "good"
    cli("train", "--data", dataset_dir, "--out", good, "--steps", 2, *FAST)
    cases = [
        (["--data", tmp_path / "missing", "--out", tmp_path / "r1"], "not a psdclip dataset"),
        (["--data", dataset_dir / "subsets" / "7pct.json", "--out", tmp_path / "r2"], "no such subset (available: 100pct, 10pct)"),
        (["--data", tmp_path / "nothing", "--out", tmp_path / "r3"], "has no successful samples"),
        (["--data", dataset_dir, "--out", good, "--model", tmp_path / "other.json", "--steps", 4],
         "checkpoint is for model 'psdclip-rn-small', not 'other'"),
        (["--data", dataset_dir, "--out", tmp_path / "r6", "--precision", "amp"],
         "--precision amp: fp16 with loss scaling runs on CUDA only"),
        # a teacher temperature that overflows the teacher's softmax makes the loss NaN
        (["--data", dataset_dir, "--out", tmp_path / "r4", "--teacher-temperature", "1e-45", "--alpha-start", "0.5",
          "--steps", 3], "non-finite loss at step 0"),
        (["--data", dataset_dir, "--out", tmp_path / "r5", "--model", "no-such-model"], "--model 'no-such-model'"),
    ]
    for args, expect in cases:
        base = ["--batch-size", "32", "--workers", "1", "--no-progress"]
        r = cli("train", *args, *base, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
        code = 1 if "non-finite" in expect else 2  # a failure of the work exits 1, bad input 2
        assert r.returncode == code and len(lines) == 1 and expect in lines[0], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert list((tmp_path / "r4").glob("nan_step_*.json"))


def test_nan_policy_skip_goes_on(dataset_dir, tmp_path):
    run = tmp_path / "skip"
    r = cli("train", "--data", dataset_dir, "--out", run, "--teacher-temperature", "1e-45", "--alpha-start", "0.5",
                "--steps", 3, "--log-every", 1, "--nan-policy", "skip", *FAST)
    assert "non-finite loss at step 0; step skipped" in r.stderr
    assert not os.path.exists(run / "metrics.jsonl") or all(m["skipped_steps"] >= 1 for m in metrics(run))


@pytest.mark.parametrize("sig,to", [(signal.SIGINT, "group"), (signal.SIGTERM, "trainer"), (signal.SIGTERM, "group")])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_then_stops(dataset_dir, tmp_path, sig, to):
    """Ctrl-C reaches the whole process group (loader workers too), as does Slurm's scancel; torchrun or a
    container runtime signals the trainer alone."""
    run = tmp_path / "run"
    args = ["train", "--data", dataset_dir, "--out", run, "--steps", 500, "--checkpoint-every", 1000, "--log-every", 1,
            *FAST]
    proc = subprocess.Popen([os.path.join(BIN, "psdclip"), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (run / "metrics.jsonl").exists() and len(metrics(run)) >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "checkpoint saved" in err and "Traceback" not in err, err[-2000:]
    saved = [n for n in os.listdir(run / "checkpoints") if n.endswith(".pt")]
    assert len(saved) == 1
    step = torch.load(run / "checkpoints" / saved[0], weights_only=True)["step"]
    assert 2 <= step < 500 and step == metrics(run)[-1]["step"]
    r = cli(*args[:-len(FAST)], "--stop-after", 1, *FAST)
    assert f"(step {step})" in r.stderr and metrics(run)[-1]["step"] == step + 1


def test_a_model_from_a_json_config_evaluates_and_exports_without_the_file(dataset_dir, synth_dir, tmp_path):
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                              "patch_size": 16},
                               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                            "layers": 1}}))
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    cli("train", "--data", dataset_dir, "--out", run, "--model", cfg, "--steps", 2, "--batch-size", 16,
            "--workers", 0, "--warmup", 1, "--no-progress", "--threads", 1)
    assert torch.get_num_threads() == threads  # --threads held for the run only
    assert "threads: 1" in (run / "config.yaml").read_text()
    cfg.unlink()  # the run alone must be enough
    r = cli("eval", run, "--suite", f"synthetic:{synth_dir}", "--workers", 0)
    assert "checkpoint step 2, mine" in r.stdout
    cli("export", run, "--out", tmp_path / "out" / "mine.pt")
    exported = json.loads((tmp_path / "out" / "mine.json").read_text())
    assert exported["embed_dim"] == 32 and exported["vision_cfg"]["image_size"] == 32


def test_fine_tuning_from_an_export_or_a_run_with_locked_towers(runs, dataset_dir, tmp_path):
    """--pretrained from a `psdclip export` file or a run; --lock-image (LiT) keeps the image tower's pretrained
    weights exactly while the text tower trains, --lock-text the other way round; --grad-checkpointing changes no
    loss; weights that do not fit the model, or an unknown tag, are one-line errors."""
    cli("export", runs[0], "--out", tmp_path / "base.pt")
    src = torch.load(tmp_path / "base.pt", weights_only=True)["state_dict"]
    image = [k for k in src if k.startswith("visual.")]
    text = [k for k in src if k.startswith(("transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                                            "text_projection"))]
    common = ["--data", dataset_dir, "--steps", 3, "--batch-size", 16, "--workers", 0, "--no-progress",
              "--warmup", 1, "--lr", 0.01, "--log-every", 1]

    def final(run):
        return torch.load(run / "checkpoints" / "step_000003.pt", weights_only=True)["model"]

    r = cli("train", *common, "--out", tmp_path / "lit", "--pretrained", tmp_path / "base.pt", "--lock-image")
    assert "starting from the weights of" in r.stderr
    got = final(tmp_path / "lit")
    assert all(torch.equal(got[k], src[k]) for k in image) and not all(torch.equal(got[k], src[k]) for k in text)
    cli("train", *common, "--out", tmp_path / "lt", "--pretrained", runs[0], "--lock-text")
    got = final(tmp_path / "lt")
    assert all(torch.equal(got[k], src[k]) for k in text) and not all(torch.equal(got[k], src[k]) for k in image)
    cli("train", *common, "--out", tmp_path / "gc", "--pretrained", runs[0], "--grad-checkpointing")
    cli("train", *common, "--out", tmp_path / "plain", "--pretrained", runs[0])
    losses = [[json.loads(ln)["loss"] for ln in open(tmp_path / run / "metrics.jsonl")] for run in ("gc", "plain")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    # an external teacher of another architecture (tiny, 64 px, 32 tokens) for an rn-small student (48 px, 16):
    # frozen, not saved in checkpoints; a resume with another teacher is refused
    teacher_model = build_model("tiny")[0]
    torch.save({"state_dict": teacher_model.state_dict()}, tmp_path / "teacher.pt")
    cli("train", *common, "--out", tmp_path / "distill", "--distill-model", "tiny", "--distill-pretrained",
        tmp_path / "teacher.pt", "--alpha-start", 0.5)
    state = torch.load(tmp_path / "distill" / "checkpoints" / "step_000003.pt", weights_only=True)
    assert state.get("teacher") is None and not any(k.startswith("model.") for k in state["model"])
    rows = [json.loads(ln) for ln in open(tmp_path / "distill" / "metrics.jsonl")]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["alpha"] > 0.4 for r in rows)
    changed = cli("train", *common, "--out", tmp_path / "distill", "--steps", 4, "--distill-model", "tiny",
                  "--distill-pretrained", runs[0], "--alpha-start", 0.5, check=False)
    assert changed.returncode == 2 and "--distill-pretrained" in changed.stderr
    # --loss siglip from a CLIP run: the towers' weights, and open_clip's init of the bias (-10) that then learns;
    # the run loads back (eval, index) and exports to a checkpoint that open_clip itself loads
    cli("train", *common, "--out", tmp_path / "siglip", "--pretrained", runs[0], "--loss", "siglip")
    got = final(tmp_path / "siglip")
    assert got["logit_bias"].numel() == 1 and -10.5 < float(got["logit_bias"]) < -9.5
    assert float(got["logit_bias"]) != -10.0
    rows = [json.loads(ln) for ln in open(tmp_path / "siglip" / "metrics.jsonl")]
    assert all(r["loss"] == r["loss"] for r in rows) and len(rows) == 3
    from psdclip.train.loading import load_model

    assert load_model(str(tmp_path / "siglip")).model.logit_bias is not None
    cli("export", tmp_path / "siglip", "--out", tmp_path / "siglip.pt")
    import open_clip

    open_clip.add_model_config(str(tmp_path / "siglip.json"))
    model, _, _ = open_clip.create_model_and_transforms("siglip", pretrained=str(tmp_path / "siglip.pt"))
    assert torch.equal(model.logit_bias.detach(), got["logit_bias"])
    bad = cli("train", *common, "--out", tmp_path / "bad", "--model", "rn-small", "--pretrained", tmp_path / "base.pt",
              check=False)
    assert bad.returncode == 2 and "do not fit --model psdclip-rn-small" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    tag = cli("train", *common, "--out", tmp_path / "tag", "--pretrained", "no_such_tag", check=False)
    assert tag.returncode == 2 and "neither a file nor a run, nor an open_clip pretrained tag" in tag.stderr


def test_checkpoint_writes_run_in_the_background_on_a_snapshot():
    """Rank 0's checkpoint write does not hold up the step: submit returns while the job runs, the payload is a copy
    that later in-place updates do not reach, one job is in flight at a time, and a job's error surfaces in the
    training thread at the next wait."""
    import threading

    from psdclip.train.checkpoint import BackgroundWriter as _BackgroundWriter, snapshot as _snapshot

    weights = {"w": torch.ones(3), "opt": {"state": {0: {"exp_avg": torch.zeros(2)}}, "groups": [{"lr": 0.1}]}}
    snap = _snapshot(weights)
    weights["w"].add_(1)
    weights["opt"]["state"][0]["exp_avg"].add_(5)
    assert torch.equal(snap["w"], torch.ones(3)) and torch.equal(snap["opt"]["state"][0]["exp_avg"], torch.zeros(2))
    assert snap["opt"]["groups"] == [{"lr": 0.1}]
    writer, release, order = _BackgroundWriter(), threading.Event(), []
    writer.submit(lambda: (release.wait(5), order.append("first")))
    assert order == []  # submit returned while the job waits
    release.set()
    writer.submit(lambda: order.append("second"))  # waits for the first job before starting
    writer.wait()
    assert order == ["first", "second"]
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.wait()  # reported once


def test_one_training_per_run_folder_and_a_resume_keeps_its_settings(dataset_dir, tmp_path):
    """Two `psdclip train` into one --out: the second is refused while the first runs (their checkpoints and
    metrics.jsonl would interleave). A resume with a flag that changes what is trained is refused with one line
    naming each; flags of how it runs (--steps, --workers, logging) may change; every start is kept in
    config_history.jsonl."""
    run = tmp_path / "run"
    first = subprocess.Popen([os.path.join(BIN, "psdclip"), "train", "--data", str(dataset_dir), "--out", str(run),
                              "--steps", "100000", *FAST], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        r = cli("train", "--data", dataset_dir, "--out", run, "--steps", 2, *FAST, check=False)
        assert r.returncode == 2 and "another `psdclip train` (pid" in r.stderr, r.stderr[-2000:]
    finally:
        first.kill()
        first.wait(timeout=60)
    resumed = tmp_path / "resumed"
    cli("train", "--data", dataset_dir, "--out", resumed, "--steps", 2, "--loss", "clip", "--lr", "1e-3", *FAST)
    r = cli("train", "--data", dataset_dir, "--out", resumed, "--steps", 4, "--loss", "psd", "--lr", "0.01",
            *FAST[:2], "--batch-size", "16", *FAST[4:], check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    for change in ("--loss clip -> psd", "--lr 0.001 -> 0.01", "--batch-size 32 -> 16"):
        assert change in lines[0], lines[0]
    assert [m["step"] for m in metrics(resumed)] == [2] or max(m["step"] for m in metrics(resumed)) == 2
    # how it runs may change: more steps, another log interval
    cli("train", "--data", dataset_dir, "--out", resumed, "--steps", 4, "--loss", "clip", "--lr", "1e-3",
        "--log-every", 1, *FAST)
    assert max(m["step"] for m in metrics(resumed)) == 4
    history = [json.loads(line) for line in open(resumed / "config_history.jsonl")]
    assert [h["step"] for h in history] == [0, 2] and [h["config"]["log_every"] for h in history] == [10, 1]


def test_a_mixture_trains_counts_its_sources_and_resumes(dataset_dir, tmp_path):
    """`--data A::B --data-weights 0.7,0.3`: metrics.jsonl counts each log interval's samples per source (all
    ranks), and a stopped run resumes each source where it was (the same metrics as an uninterrupted run)."""
    a, b = dataset_dir / "subsets" / "10pct.json", dataset_dir / "subsets" / "100pct.json"
    common = ["--data", f"{a}::{b}", "--data-weights", "0.7,0.3", "--steps", 4, "--batch-size", 16, "--workers", 0,
              "--no-progress", "--log-every", 1, "--checkpoint-every", 2, "--warmup", 1, "--model", "rn-small"]
    cli("train", *common, "--out", tmp_path / "whole")
    cli("train", *common, "--out", tmp_path / "parts", "--stop-after", 2)
    cli("train", *common, "--out", tmp_path / "parts")
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [r["source_samples"] for r in whole] == [r["source_samples"] for r in parts]
    assert all(sum(r["source_samples"].values()) == 16 and set(r["source_samples"]) == {str(a), str(b)} for r in whole)
    assert [r["loss"] for r in whole] == pytest.approx([r["loss"] for r in parts], abs=1e-5)
    bad = cli("train", *common[:2], "--data-weights", "1,2,3", "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "--data-weights: 3 weight(s) for the 2 source(s)" in bad.stderr


def test_a_run_begun_under_an_old_default_resumes_with_its_own(dataset_dir, tmp_path):
    """--teacher-temperature's default changed (1 -> 2, issue 26). A run begun with the old value resumes without
    the flag and keeps it (said in one line), also when its config.yaml predates the option; naming another value
    on the resume is refused as any change of what is trained."""
    run = tmp_path / "old"
    cli("train", "--data", dataset_dir, "--out", run, "--steps", 2, "--loss", "psd", "--teacher-temperature", 1.0,
        *FAST)
    r = cli("train", "--data", dataset_dir, "--out", run, "--steps", 3, "--loss", "psd", *FAST)
    assert "was begun with --teacher-temperature 1.0, a default that has changed since: kept" in r.stderr
    assert yaml.safe_load(open(run / "config.yaml"))["teacher_temperature"] == 1.0
    assert max(m["step"] for m in metrics(run)) == 3
    old = yaml.safe_load(open(run / "config.yaml"))
    del old["teacher_temperature"]  # a run older than the option: it trained at the old default
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    cli("train", "--data", dataset_dir, "--out", run, "--steps", 4, "--loss", "psd", *FAST)
    assert yaml.safe_load(open(run / "config.yaml"))["teacher_temperature"] == 1.0
    r = cli("train", "--data", dataset_dir, "--out", run, "--steps", 5, "--loss", "psd", "--teacher-temperature", 2,
            *FAST, check=False)
    assert r.returncode == 2 and "--teacher-temperature 1.0 -> 2.0" in r.stderr, r.stderr[-2000:]
    # a new run takes the new default
    new = tmp_path / "new"
    cli("train", "--data", dataset_dir, "--out", new, "--steps", 1, "--loss", "psd", *FAST)
    assert yaml.safe_load(open(new / "config.yaml"))["teacher_temperature"] == 2.0


def test_damaged_run_config_and_options_the_machine_cannot_use_are_one_line(dataset_dir, tmp_path):
    """A run folder whose config.yaml is not YAML or not a mapping, an --out that is a file, a learning rate that
    leaves the floats at once, and thread or loader-process counts far beyond the machine: each one line, exit 2,
    before anything trains (they were tracebacks, a segfault at --threads 100000, a hang at --workers 1000000)."""
    base = ["--data", dataset_dir, "--batch-size", "32", "--no-progress", "--steps", "2"]
    (tmp_path / "afile").write_text("x")
    for name, text in (("bad-yaml", "steps: [1, 2\n"), ("a-list", yaml.safe_dump([1, 2, 3]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(text)
    cores = os.cpu_count() or 1
    cases = [
        (["--out", tmp_path / "bad-yaml", "--workers", "1"], "cannot read the run's config"),
        (["--out", tmp_path / "a-list", "--workers", "1"], "not a mapping of options"),
        (["--out", tmp_path / "afile", "--workers", "1"], "is a file, not a run folder"),
        (["--out", tmp_path / "r1", "--lr", "1e308", "--workers", "1"], "--lr 1e+308: at most"),
        (["--out", tmp_path / "r2", "--threads", "100000", "--workers", "1"], f"on its {cores} cores"),
        (["--out", tmp_path / "r3", "--workers", "1000000"], "--workers 1000000: at most"),
        (["--out", tmp_path / "r4", "--dist-timeout", "1e300", "--workers", "1"], "--dist-timeout must be in"),
    ]
    for args, expect in cases:
        r = cli("train", *base, *args, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("psdclip: error")]
        assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], (args, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
    assert not any((tmp_path / f"r{k}").exists() for k in range(1, 5))
    assert (tmp_path / "afile").read_text() == "x" and not list((tmp_path / "bad-yaml").glob("checkpoints"))


def test_a_run_resumes_only_on_the_data_it_began_with(dataset_dir, tmp_path):
    """A run records what it trains on (the dataset's id; a subset's shards, boundary and count): resuming on a
    dataset rebuilt in place, or on a subset whose boundary an append moved, is one line instead of training on
    other samples with exit 0; the same data resumes."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds, symlinks=True)
    subset = ds / "subsets" / "10pct.json"
    for data, run in ((subset, tmp_path / "on-subset"), (ds, tmp_path / "on-dataset")):
        cli("train", "--data", data, "--out", run, "--steps", 4, "--stop-after", 2, "--checkpoint-every", 2, *FAST,
            "--batch-size", 16)
    saved_subset, saved_info = subset.read_text(), (ds / "dataset.json").read_text()
    doc = json.loads(saved_subset)
    doc["count"] += 7  # what an append does to a size subset: its boundary moves
    doc["boundary"] = {**(doc.get("boundary") or {"shard": doc["shards"][0]}), "max_rank": "123", "count": 9}
    subset.write_text(json.dumps(doc))
    r = cli("train", "--data", subset, "--out", tmp_path / "on-subset", "--steps", 4, *FAST, "--batch-size", 16,
            check=False)
    assert r.returncode == 2 and "the subset changed since this run began" in r.stderr, r.stderr[-1500:]
    subset.write_text(saved_subset)
    (ds / "dataset.json").write_text(json.dumps({**json.loads(saved_info), "id": "rebuilt-in-place"}))
    r = cli("train", "--data", ds, "--out", tmp_path / "on-dataset", "--steps", 4, *FAST, "--batch-size", 16,
            check=False)
    assert r.returncode == 2 and "not the dataset this run was trained on" in r.stderr, r.stderr[-1500:]
    (ds / "dataset.json").write_text(saved_info)
    for data, run in ((subset, tmp_path / "on-subset"), (ds, tmp_path / "on-dataset")):
        assert cli("train", "--data", data, "--out", run, "--steps", 4, *FAST, "--batch-size", 16).returncode == 0
        assert metrics(run)[-1]["step"] == 4

"""The PSD study's controls and the embedding-bank teacher: label smoothing, oracle targets and the bank's logits
each against a hand-computed target, the bank's rows against the features the model produced, and a resumed
bank run against an uninterrupted one."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers.cli import cli

from psdclip.train.bank import EmbeddingBank
from psdclip.train.losses import CLIPLoss, PSDLoss, constant_schedule
from psdclip.train.oracle import oracle_targets

FAST = ["--model", "rn-small", "--batch-size", "32", "--workers", "1", "--shuffle-buffer", "64", "--warmup", "3",
        "--no-progress"]


def feats(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return i, t, torch.tensor(10.0)


def soft_ce(logits, target):
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def test_label_smoothing_loss_and_gradient_by_hand():
    i, t, s = feats()
    eps = 0.2
    out = CLIPLoss(label_smoothing=eps)(i, t, s)["contrastive_loss"]
    gi, gt = torch.autograd.grad(out, (i, t))
    i2, t2 = i.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    logits = s * i2 @ t2.T
    n = len(logits)
    target = (1 - eps) * torch.eye(n) + eps / n
    ref = (soft_ce(logits, target) + soft_ce(logits.T, target)) / 2
    ri, rt = torch.autograd.grad(ref, (i2, t2))
    assert abs(float(out.detach()) - float(ref.detach())) < 1e-6
    assert torch.allclose(gi, ri, atol=1e-6) and torch.allclose(gt, rt, atol=1e-6)
    plain = CLIPLoss()(i, t, s)["contrastive_loss"]
    assert abs(float(plain) - float(out)) > 1e-3  # it is not CLIP


def test_oracle_targets_loss_and_gradient_by_hand():
    """Image i's target mass alpha is spread over the texts whose group is i's image group (and each text's over
    the images); a row with no match (text group none) keeps one-hot."""
    image_g = [0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 1]
    text_g = [0, 1, 1, 1, 2, -1, 0, 1, 2, 3, 0, 1]  # sample 1 mismatched (says 1), 5 says nothing, 10 says 0
    codes = torch.tensor(list(zip(image_g, text_g)))
    p_i, p_t = oracle_targets(codes, codes)
    n, alpha = len(codes), 0.5
    hand_i, hand_t = torch.zeros(n, n), torch.zeros(n, n)
    for a in range(n):
        fits = [b for b in range(n) if text_g[b] == image_g[a] and text_g[b] >= 0]
        for b in fits:
            hand_i[a, b] = 1 / len(fits)
        fits = [b for b in range(n) if text_g[a] >= 0 and image_g[b] == text_g[a]]
        for b in fits:
            hand_t[a, b] = 1 / len(fits)
    assert torch.allclose(p_i, hand_i) and torch.allclose(p_t, hand_t)
    assert float(p_t[5].sum()) == 0.0  # a caption that names nothing: no oracle row
    i, t, s = feats(n)
    out = PSDLoss(constant_schedule(alpha))(i, t, s, step=1, teacher_targets=(p_i, p_t))
    gi, gt = torch.autograd.grad(out["contrastive_loss"], (i, t))
    i2, t2 = i.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    logits = s * i2 @ t2.T
    eye = torch.eye(n)
    ti = torch.where(hand_i.sum(1, keepdim=True) > 0, (1 - alpha) * eye + alpha * hand_i, eye)
    tt = torch.where(hand_t.sum(1, keepdim=True) > 0, (1 - alpha) * eye + alpha * hand_t, eye)
    ref = (soft_ce(logits, ti) + soft_ce(logits.T, tt)) / 2
    ri, rt = torch.autograd.grad(ref, (i2, t2))
    assert abs(float(out["contrastive_loss"]) - float(ref)) < 1e-6
    assert torch.allclose(gi, ri, atol=1e-6) and torch.allclose(gt, rt, atol=1e-6)
    assert float(out["distill_rows"]) == pytest.approx((n + n - 1) / (2 * n))


def test_bank_teacher_logits_by_hand_and_unseen_samples_keep_one_hot(tmp_path):
    bank = EmbeddingBank(str(tmp_path / "bank"), 0, ids=20, dim=8, made_for={"data": "x"})
    bank.start(0)
    i, t, s = feats(6, seed=3)
    ids = torch.tensor([4, 9, 2, 17, 0, 11])
    seen = [4, 9, 2, 0]  # 17 and 11 not seen yet
    bank.write(torch.tensor(seen), i.detach()[[0, 1, 2, 4]], t.detach()[[0, 1, 2, 4]])
    li, lt = bank.teacher_logits(ids, s)
    bi = i.detach().half().float()  # fp16 rows
    bt = t.detach().half().float()
    ok = torch.tensor([True, True, True, False, True, False])
    want_i = torch.where(ok[:, None] & ok[None, :], s * bi @ bt.T, float("-inf"))
    assert torch.equal(torch.isinf(li), torch.isinf(want_i))
    assert torch.allclose(li[ok][:, ok], want_i[ok][:, ok], atol=1e-6)
    assert torch.allclose(lt[ok][:, ok], (s * bt @ bi.T)[ok][:, ok], atol=1e-6)
    # through the loss: unseen rows keep one-hot, seen rows mix the teacher over the seen columns only
    student_i, student_t, _ = feats(6, seed=4)
    loss = PSDLoss(constant_schedule(0.5), teacher_temperature=2.0)
    out = loss(student_i, student_t, s, step=1, teacher_logits=(li, lt))
    logits = s * student_i.detach() @ student_t.detach().T
    eye = torch.eye(6)
    teach_i = torch.where(ok[None, :], F.softmax(torch.where(ok[None, :], want_i, -1e9) / 2.0, 1), 0.0)
    teach_t = torch.where(ok[None, :], F.softmax(torch.where(ok[None, :], s * bt @ bi.T, -1e9) / 2.0, 1), 0.0)
    ti = torch.where(ok[:, None], 0.5 * eye + 0.5 * teach_i, eye)
    tt = torch.where(ok[:, None], 0.5 * eye + 0.5 * teach_t, eye)
    ref = (soft_ce(logits, ti) + soft_ce(logits.T, tt)) / 2
    assert abs(float(out["contrastive_loss"]) - float(ref)) < 1e-5
    assert float(out["distill_rows"]) == pytest.approx(4 / 6)
    # made for one run, refused for another
    with pytest.raises(Exception, match="made for another run"):
        EmbeddingBank(str(tmp_path / "bank"), 0, ids=21, dim=8, made_for={"data": "x"})


@pytest.mark.parametrize("accum", [1, 2])
def test_bank_rows_are_the_features_the_model_produced_and_feed_the_next_visit(tmp_path, accum):
    from psdclip.train.bank import BankTeacher
    from psdclip.train.loop import forward_backward
    from psdclip.train.models import build_model

    torch.manual_seed(0)
    model, _, _, tok = build_model("rn-small")
    images = torch.randn(8, 3, 48, 48)
    texts = tok([f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "star", "cross", "square")])
    bank = EmbeddingBank(str(tmp_path / "bank"), 0, ids=50, dim=model.text_projection.shape[1], made_for={})
    bank.start(0)
    ids = torch.tensor([3, 7, 11, 19, 23, 31, 37, 41])
    loss_fn = PSDLoss(constant_schedule(0.5))
    m = 8 // accum
    micro = [(images[k * m:(k + 1) * m], texts[k * m:(k + 1) * m]) for k in range(accum)]
    with torch.no_grad():
        model.train()
        # the step's own features (train mode: batch-norm statistics of each micro-batch), as the step computes them
        outs = [model(x, y) for x, y in micro]
        want = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    teacher, keep = BankTeacher(bank, "x").for_step(model, loss_fn, [], ids, 1, torch.device("cpu"))
    first = forward_backward(model, model, loss_fn, micro, step=1, teacher=teacher, on_features=keep)
    assert float(first["distill_rows"]) == 0.0  # nothing seen yet: one-hot everywhere
    rows_i, rows_t, seen = bank.lookup(ids)
    assert bool(seen.all()) and not bool(bank.lookup(torch.tensor([0, 4]))[2].any())
    assert torch.allclose(rows_i, want["image_features"], atol=2e-3)
    assert torch.allclose(rows_t, want["text_features"], atol=2e-3)
    model.zero_grad()
    teacher, keep = BankTeacher(bank, "x").for_step(model, loss_fn, [], ids, 1, torch.device("cpu"))
    second = forward_backward(model, model, loss_fn, micro, step=2, teacher=teacher, on_features=keep)
    assert float(second["distill_rows"]) == 1.0  # every sample was seen: every row gets the bank's targets


def test_bank_teacher_resumes_with_the_bank_it_had(dataset_dir, tmp_path):
    """A bank run stopped half-way and resumed trains as the uninterrupted one (same losses, same bank); the
    second epoch's rows are distilled from the first epoch's bank."""
    common = ["--data", dataset_dir / "subsets" / "100pct.json", "--steps", 14, "--log-every", 1,
              "--checkpoint-every", 100, "--loss", "psd", "--bank-teacher", "--alpha-start", "0.5",
              "--teacher-temperature", "2", *FAST]
    cli("train", "--out", tmp_path / "whole", *common)
    cli("train", "--out", tmp_path / "split", "--stop-after", 10, *common)
    assert "rank0.step_000010.f16" in os.listdir(tmp_path / "split" / "bank")
    cli("train", "--out", tmp_path / "split", *common)
    rows = lambda run: [json.loads(x) for x in open(run / "metrics.jsonl")]  # noqa: E731
    whole, split = rows(tmp_path / "whole"), rows(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 15))
    for a, b in zip(whole, split):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
    # ~270 samples, batch 32: the first pass (8 steps) is one-hot, the second is distilled
    assert whole[0]["distill_rows"] == 0.0 and whole[-1]["distill_rows"] > 0.5
    meta = json.load(open(tmp_path / "whole" / "bank" / "bank.json"))
    shape = (meta["ids"], 2, meta["dim"])
    a = np.memmap(tmp_path / "whole" / "bank" / "rank0.f16", dtype=np.float16, mode="r", shape=shape)
    b = np.memmap(tmp_path / "split" / "bank" / "rank0.f16", dtype=np.float16, mode="r", shape=shape)
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(np.abs(a.astype(float) - b)) < 2e-3
    seen = ~np.isnan(a[:, 0, 0])
    assert 0.8 * 270 <= seen.sum() <= meta["ids"]
    norms = np.linalg.norm(a[seen].astype(float), axis=-1)
    assert np.allclose(norms, 1.0, atol=5e-3)  # normalised features, as the model gives them
    # a resume whose bank copy is gone is refused in one line, not restarted from an empty bank
    os.remove(tmp_path / "split" / "bank" / "rank0.step_000014.f16")
    r = cli("train", "--out", tmp_path / "split", *common[:5], 20, *common[6:], check=False)
    assert r.returncode != 0 and "no embedding bank saved with the checkpoint of step 14" in r.stderr
    assert "Traceback" not in r.stderr


def test_oracle_targets_end_to_end(dataset_dir, synth_dir, tmp_path):
    groups = tmp_path / "oracle.parquet"
    out = cli("data", "oracle", dataset_dir, "--source", synth_dir, "--out", groups).stdout
    assert "image groups" in out
    table = pd.read_parquet(groups)
    attrs = pd.read_parquet(synth_dir / "attributes.parquet")
    assert len(table) == json.load(open(dataset_dir / "dataset.json"))["counts"]["success"]
    assert table["image_group"].str.contains("|", regex=False).all()
    # a clean caption's text group is its image's, a mismatched one's (mostly) another's
    kinds = attrs.set_index("caption_kind")
    fits = (table["image_group"] == table["text_group"]).mean()
    share_mismatch = (kinds.index == "mismatch").mean() + (kinds.index == "lowinfo").mean()
    assert 1 - share_mismatch - 0.1 <= fits < 1.0
    run = tmp_path / "run"
    cli("train", "--data", dataset_dir, "--out", run, "--steps", 4, "--log-every", 1, "--loss", "psd",
        "--oracle-targets", groups, "--alpha-start", "0.5", *FAST)
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert all(0.5 < r["distill_rows"] <= 1.0 for r in rows)
    # a file that misses samples is one line
    table.iloc[:10].to_parquet(tmp_path / "short.parquet")
    r = cli("train", "--data", dataset_dir, "--out", tmp_path / "run2", "--steps", 2, "--loss", "psd",
            "--oracle-targets", tmp_path / "short.parquet", *FAST, check=False)
    assert r.returncode != 0 and "no row for sample" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--data", dataset_dir, "--out", tmp_path / "run3", "--steps", 2, "--loss", "clip",
            "--oracle-targets", groups, *FAST, check=False)
    assert r.returncode != 0 and "use --loss psd" in r.stderr

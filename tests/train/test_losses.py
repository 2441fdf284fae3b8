import torch
import torch.nn.functional as F

from psdclip.train.losses import CLIPLoss, PSDLoss, PSDSchedule, ramp
from psdclip.train.loop import lr_at
from psdclip.train.config import TrainConfig


def feats(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return i, t, torch.tensor(10.0)


def test_psd_with_alpha_zero_is_clip():
    i, t, s = feats()
    clip = CLIPLoss()(i, t, s)["contrastive_loss"]
    psd = PSDLoss(PSDSchedule(100, 0.0, 0.0))(i, t, s, step=50)["contrastive_loss"]
    assert abs(float(clip) - float(psd)) < 1e-6
    # by hand: symmetric cross-entropy with the diagonal as labels
    logits = s * i @ t.T
    labels = torch.arange(len(i))
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert abs(float(ref) - float(clip)) < 1e-6


def test_psd_targets_by_hand_and_no_gradient_through_the_teacher():
    i, t, s = feats()
    alpha = 0.4
    loss = PSDLoss(PSDSchedule(10, alpha, alpha, "constant"))(i, t, s, step=3)["contrastive_loss"]
    loss.backward()
    gi, gt = i.grad.clone(), t.grad.clone()
    # the same loss with the teacher as a constant computed outside autograd
    i2, t2 = i.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    logits = s * i2 @ t2.T
    with torch.no_grad():
        teach_i, teach_t = F.softmax(logits, 1), F.softmax(logits.T, 1)
    eye = torch.eye(len(i))
    ti, tt = (1 - alpha) * eye + alpha * teach_i, (1 - alpha) * eye + alpha * teach_t
    assert torch.allclose(ti.sum(1), torch.ones(len(i))) and torch.allclose(tt.sum(1), torch.ones(len(i)))
    ref = (-(ti * F.log_softmax(logits, 1)).sum(1).mean() - (tt * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2
    ref.backward()
    assert abs(float(ref) - float(loss)) < 1e-6
    assert torch.allclose(gi, i2.grad, atol=1e-6) and torch.allclose(gt, t2.grad, atol=1e-6)


def test_rho_selects_a_subset_of_rows_deterministically():
    loss = PSDLoss(PSDSchedule(10, 0.5, 0.5, "constant", 0.25, 0.25, "constant"), seed=3)
    m1 = loss.row_mask(7, 4096, 4096, 0.25, "cpu")
    m2 = loss.row_mask(7, 4096, 4096, 0.25, "cpu")
    assert torch.equal(m1, m2) and 0.2 < m1.float().mean() < 0.3
    i, t, s = feats()
    out = loss(i, t, s, step=7)
    assert 0 <= float(out["distill_rows"]) <= 1 and float(out["alpha"]) == 0.5


def test_schedules_are_monotone_and_reach_their_end_points():
    for kind in ("linear", "cosine"):
        vals = [ramp(s, 100, 0.1, 0.7, kind) for s in range(0, 121)]
        assert abs(vals[0] - 0.1) < 1e-12 and abs(vals[100] - 0.7) < 1e-12 and vals[120] == vals[100]
        assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert ramp(5, 100, 0.1, 0.7, "constant") == 0.7
    sched = PSDSchedule(50, 0.0, 0.6)
    assert sched.alpha_at(0) == 0.0 and abs(sched.alpha_at(50) - 0.6) < 1e-12


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(data="x", out="y", steps=100, warmup=10, lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert abs(lrs[9] - 1e-3) < 1e-12 and lrs[0] == 1e-4
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= 1e-5


def test_same_pass_teacher_at_temperature_one_only_rescales_each_rows_gradient():
    """A finding the sweep surfaced: with the teacher = the detached softmax of the same logits at T = 1, a
    distilled row's gradient is (1 - alpha) x its CLIP gradient. With rho = 1 that is a uniform rescaling,
    which Adam undoes, so PSD trains like CLIP; a teacher temperature != 1 (or rho < 1, or the EMA teacher)
    is what changes training."""
    i, t, s = feats()
    clip = CLIPLoss()(i, t, s)["contrastive_loss"]
    (gi_clip,) = torch.autograd.grad(clip, i)
    alpha = 0.4
    psd = PSDLoss(PSDSchedule(10, alpha, alpha, "constant"))(i, t, s, step=1)["contrastive_loss"]
    (gi_psd,) = torch.autograd.grad(psd, i)
    assert torch.allclose(gi_psd, (1 - alpha) * gi_clip, atol=1e-6)
    warm = PSDLoss(PSDSchedule(10, alpha, alpha, "constant"), teacher_temperature=2.0)(i, t, s, step=1)
    (gi_warm,) = torch.autograd.grad(warm["contrastive_loss"], i)
    assert not torch.allclose(gi_warm, (1 - alpha) * gi_clip, atol=1e-4)

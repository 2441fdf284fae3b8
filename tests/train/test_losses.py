import pytest
import torch
import torch.nn.functional as F

from psdclip.train.losses import CLIPLoss, PSDLoss, PSDSchedule, constant_schedule, ramp
from psdclip.train.schedule import lr_at
from psdclip.train.config import TrainConfig


def feats(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return i, t, torch.tensor(10.0)


def test_psd_with_alpha_zero_is_clip():
    i, t, s = feats()
    clip = CLIPLoss()(i, t, s)["contrastive_loss"]
    psd = PSDLoss(PSDSchedule(total_steps=100, alpha_start=0.0, alpha_max=0.0))(i, t, s, step=50)["contrastive_loss"]
    assert abs(float(clip) - float(psd)) < 1e-6
    # by hand: symmetric cross-entropy with the diagonal as labels
    logits = s * i @ t.T
    labels = torch.arange(len(i))
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert abs(float(ref) - float(clip)) < 1e-6


def test_psd_targets_by_hand_and_no_gradient_through_the_teacher():
    i, t, s = feats()
    alpha = 0.4
    loss = PSDLoss(constant_schedule(alpha))(i, t, s, step=3)["contrastive_loss"]
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
    loss = PSDLoss(constant_schedule(0.5, 0.25), seed=3)
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
    sched = PSDSchedule(total_steps=50, alpha_start=0.0, alpha_max=0.6)
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
    psd = PSDLoss(constant_schedule(alpha))(i, t, s, step=1)["contrastive_loss"]
    (gi_psd,) = torch.autograd.grad(psd, i)
    assert torch.allclose(gi_psd, (1 - alpha) * gi_clip, atol=1e-6)
    warm = PSDLoss(constant_schedule(alpha), teacher_temperature=2.0)(i, t, s, step=1)
    (gi_warm,) = torch.autograd.grad(warm["contrastive_loss"], i)
    assert not torch.allclose(gi_warm, (1 - alpha) * gi_clip, atol=1e-4)


def test_the_default_psd_is_not_a_rescaled_clip():
    """`psdclip train --loss psd` with no other flag: its gradient is not CLIP's times a factor, for the batch as a
    whole nor row by row (the old default, the same-pass teacher at T = 1 and rho = 1, was exactly that)."""
    from psdclip.train.objectives import make_loss

    cfg = TrainConfig(data="x", out="y", steps=100)
    assert cfg.loss == "psd"
    loss = make_loss(cfg, 0, 1)
    i, t, s = feats()
    (g_clip,) = torch.autograd.grad(CLIPLoss()(i, t, s)["contrastive_loss"], i)
    out = loss(i, t, s, step=80)
    assert float(out["alpha"]) > 0 and float(out["distill_rows"]) > 0  # it distils at this step
    (g_psd,) = torch.autograd.grad(out["contrastive_loss"], i)
    # the best factor per row, and what it leaves: CLIP rescaled leaves nothing (the old default: below 1e-6)
    c = (g_psd * g_clip).sum(1, keepdim=True) / (g_clip * g_clip).sum(1, keepdim=True)
    residual = (g_psd - c * g_clip).norm(dim=1) / g_psd.norm(dim=1)
    assert float(residual.max()) > 0.01, residual
    old = make_loss(TrainConfig(data="x", out="y", steps=100, teacher_temperature=1.0), 0, 1)
    (g_old,) = torch.autograd.grad(old(i, t, s, step=80)["contrastive_loss"], i)
    c = (g_old * g_clip).sum(1, keepdim=True) / (g_clip * g_clip).sum(1, keepdim=True)
    assert float(((g_old - c * g_clip).norm(dim=1) / g_old.norm(dim=1)).max()) < 1e-5  # the check can tell


def _by_hand(logits, teach_i, teach_t, alpha, mask):
    """The PSD loss written out: rows in `mask` get (1 - alpha)·onehot + alpha·teacher, others one-hot."""
    eye = torch.eye(len(logits))
    m = mask[:, None].float()
    ti = m * ((1 - alpha) * eye + alpha * teach_i) + (1 - m) * eye
    tt = m * ((1 - alpha) * eye + alpha * teach_t) + (1 - m) * eye
    return (-(ti * F.log_softmax(logits, 1)).sum(1).mean() - (tt * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2


def _loss_and_grads(loss_module, step=3, teacher_logits=None):
    i, t, s = feats()
    out = loss_module(i, t, s, step=step, teacher_logits=teacher_logits)["contrastive_loss"]
    gi, gt = torch.autograd.grad(out, (i, t))
    return i.detach(), t.detach(), s, out, gi, gt


def _check_against_hand(loss_module, teach_fn, mask, alpha, step=3, teacher_logits=None):
    i, t, s, out, gi, gt = _loss_and_grads(loss_module, step, teacher_logits)
    i2, t2 = i.clone().requires_grad_(), t.clone().requires_grad_()
    logits = s * i2 @ t2.T
    with torch.no_grad():
        teach_i, teach_t = teach_fn(logits.detach())
    ref = _by_hand(logits, teach_i, teach_t, alpha, mask)
    ri, rt = torch.autograd.grad(ref, (i2, t2))
    assert abs(float(ref) - float(out)) < 1e-5
    assert torch.allclose(gi, ri, atol=1e-6) and torch.allclose(gt, rt, atol=1e-6)


def test_teacher_temperature_loss_and_gradient_by_hand():
    alpha, temp = 0.6, 2.0
    loss = PSDLoss(constant_schedule(alpha), teacher_temperature=temp)
    _check_against_hand(loss, lambda lg: (F.softmax(lg / temp, 1), F.softmax(lg.T / temp, 1)),
                        torch.ones(16, dtype=torch.bool), alpha)


def test_rho_below_one_loss_and_gradient_by_hand():
    alpha, rho = 0.8, 0.5
    loss = PSDLoss(constant_schedule(alpha, rho), seed=5)
    mask = loss.row_mask(3, 16, 16, rho, "cpu")
    assert 0 < int(mask.sum()) < 16  # some rows distilled, some one-hot
    _check_against_hand(loss, lambda lg: (F.softmax(lg, 1), F.softmax(lg.T, 1)), mask, alpha)


def test_external_teacher_logits_loss_and_gradient_by_hand():
    """The EMA and snapshot teachers hand their own (detached) logits to the loss."""
    alpha = 0.5
    ti, tt, s = feats(seed=9)
    teacher = (s * ti.detach() @ tt.detach().T, s * tt.detach() @ ti.detach().T)
    loss = PSDLoss(constant_schedule(alpha), teacher_temperature=1.5)
    _check_against_hand(loss, lambda lg: (F.softmax(teacher[0] / 1.5, 1), F.softmax(teacher[1] / 1.5, 1)),
                        torch.ones(16, dtype=torch.bool), alpha, teacher_logits=teacher)


def test_soft_targets_stay_fp32_under_bf16_autocast():
    """Targets built in bf16 no longer sum to 1; the loss builds and applies them in fp32."""
    i, t, s = feats(n=64)
    loss = PSDLoss(constant_schedule(0.5), teacher_temperature=2.0)
    ref = loss(i, t, s, step=1)["contrastive_loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(i.bfloat16(), t.bfloat16(), s, step=1)["contrastive_loss"]
        logits, _ = loss.get_logits(i.bfloat16(), t.bfloat16(), s)
        target, _ = loss._with_teacher(logits, loss.teacher_probs(logits), torch.arange(64), 0.5,
                                       torch.ones(64, dtype=torch.bool))
    assert low.dtype == torch.float32 and target.dtype == torch.float32
    assert torch.allclose(target.sum(1), torch.ones(64), atol=1e-6)
    assert abs(float(low) - float(ref)) < 0.05


def test_teacher_update_averages_parameters_and_batch_norm_statistics():
    from psdclip.train.teacher import ema_update as _ema_update, make_teacher as _make_teacher

    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = _make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    student.train()(torch.randn(8, 3, 8, 8) * 3 + 1)  # moves the running statistics
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = [b.clone() for b in teacher.buffers()]
    _ema_update(teacher, student, 0.9)
    for e, b, s in zip(teacher.buffers(), before, student.buffers()):
        if e.is_floating_point():
            assert torch.allclose(e, 0.9 * b + 0.1 * s)
        else:
            assert torch.equal(e, s)
    _ema_update(teacher, student, 0.0)  # the snapshot teacher: a copy
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))
    # a resumed run rebuilds the teacher from the state it saved
    again = _make_teacher(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), teacher.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), teacher.state_dict().values()))


def test_snapshot_and_ema_teachers_of_a_clip_model_stay_finite():
    """The text tower's causal mask is a buffer of -inf: a snapshot (decay 0) once made the teacher all NaN."""
    from psdclip.train.teacher import ema_update as _ema_update, make_teacher as _make_teacher
    from psdclip.train.models import build_model

    torch.manual_seed(0)
    model, _, _, tok = build_model("rn-small")
    x, t = torch.randn(4, 3, 48, 48), tok(["a red circle", "a blue star", "two squares", "a cross"])
    for decay in (0.0, 0.99):
        teacher = _make_teacher(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        _ema_update(teacher, model, decay)
        with torch.no_grad():
            out = teacher(x, t)
        assert all(torch.isfinite(out[k]).all() for k in ("image_features", "text_features")), decay
        mask = dict(teacher.named_buffers())["attn_mask"]
        assert torch.equal(mask, dict(model.named_buffers())["attn_mask"]), decay


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_feature_cache_accumulation_equals_one_big_batch():
    """--accum 4 x 2 rows against one batch of 8: the same loss and gradients for CLIP, PSD settings that are not a
    rescaled CLIP (T != 1, rho < 1) and an EMA teacher that sees the whole batch."""
    import copy

    from psdclip.train.loop import forward_backward
    from psdclip.train.teacher import model_teacher
    from psdclip.train.models import build_model

    torch.manual_seed(0)
    model, _, _, tok = build_model("tiny")
    images = torch.randn(8, 3, 64, 64)
    texts = tok([f"{c} {s}" for c in ("red", "blue", "green", "amber") for s in ("circle", "star")])
    sched = PSDSchedule(total_steps=10, alpha_start=0.6, alpha_max=0.6, rho_start=0.5, rho_end=0.5)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a teacher that differs from the student
    cases = {"clip": (CLIPLoss(), None), "psd-T2-rho0.5": (PSDLoss(sched, teacher_temperature=2.0, seed=1), None),
             "psd-ema": (PSDLoss(sched, seed=1), ema)}
    reference = {}
    for name, (loss_fn, teacher) in cases.items():
        model.zero_grad()
        big = forward_backward(model, model, loss_fn, [(images, texts)], step=3,
                               teacher=None if teacher is None else model_teacher(teacher, loss_fn))
        g_big = reference[name] = _grads(model)
        model.zero_grad()
        micro = [(images[i:i + 2], texts[i:i + 2]) for i in range(0, 8, 2)]
        acc = forward_backward(model, model, loss_fn, micro, step=3,
                               teacher=None if teacher is None else model_teacher(teacher, loss_fn))
        g_acc = _grads(model)
        assert abs(float(big["contrastive_loss"]) - float(acc["contrastive_loss"])) < 1e-5, name
        assert g_big.keys() == g_acc.keys(), name
        worst = max(float((g_big[k] - g_acc[k]).abs().max()) for k in g_big)
        assert worst < 1e-5, (name, worst)
    # a loss per micro-batch (independent small contrastive batches) is not the same: the test can tell
    model.zero_grad()
    for im, tx in micro:
        out = model(im, tx)
        (CLIPLoss()(out["image_features"], out["text_features"], out["logit_scale"])["contrastive_loss"] / 4).backward()
    plain = _grads(model)
    assert max(float((plain[k] - reference["clip"][k]).abs().max()) for k in plain) > 1e-3


def test_accumulation_updates_batch_norm_statistics_once_per_micro_batch():
    from psdclip.train.loop import forward_backward
    from psdclip.train.models import build_model

    torch.manual_seed(0)
    model, _, _, tok = build_model("rn-small")
    images, texts = torch.randn(8, 3, 48, 48), tok(["a red circle"] * 4 + ["a blue star"] * 4)
    micro = [(images[i:i + 4], texts[i:i + 4]) for i in (0, 4)]
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for im, tx in micro:
            model(im, tx)
    expected = {k: v.clone() for k, v in model.named_buffers()}
    model.load_state_dict(reference)
    forward_backward(model, model, CLIPLoss(), micro, step=0)
    for k, v in model.named_buffers():
        assert torch.equal(v, expected[k]), k


def test_siglip_loss_and_gradient_by_hand():
    """--loss siglip is open_clip's SigLipLoss: -1/n sum_ij log sigmoid(y_ij (s i.t + b)), y = +1 on the diagonal and
    -1 off it; d loss / d logit_ij = -y_ij sigmoid(-y_ij z_ij) / n; the bias learns; logits in fp32 under bf16."""
    from psdclip.train.losses import SigLIPLoss

    torch.manual_seed(0)
    n = 6
    fi = F.normalize(torch.randn(n, 8), dim=-1).requires_grad_()
    ft = F.normalize(torch.randn(n, 8), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    out = SigLIPLoss()(fi, ft, scale, logit_bias=bias)
    out["contrastive_loss"].backward()
    got = [t.grad.clone() for t in (fi, ft, scale, bias)]
    for t in (fi, ft, scale, bias):
        t.grad = None
    y = 2 * torch.eye(n) - 1
    z = (scale * fi @ ft.T + bias)
    z.retain_grad()
    by_hand = -torch.log(torch.sigmoid(y * z)).sum() / n
    by_hand.backward()
    assert torch.allclose(out["contrastive_loss"], by_hand, rtol=1e-5)
    assert torch.allclose(z.grad, -y * torch.sigmoid(-y * z.detach()) / n, atol=1e-7)
    for a, b in zip(got, (fi.grad, ft.grad, scale.grad, bias.grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert got[3].abs().item() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = SigLIPLoss()(fi.bfloat16(), ft.bfloat16(), scale, logit_bias=bias)["contrastive_loss"]
    assert low.dtype == torch.float32
    with pytest.raises(ValueError, match="logit_bias"):
        SigLIPLoss()(fi, ft, scale)


def test_an_external_teacher_in_psd_is_half_of_open_clips_distillation_loss():
    """--distill-model: the teacher's logits enter PSD's targets. At alpha 0.5, rho 1, T 1 the loss is exactly half
    of open_clip's DistillClipLoss (contrastive + distillation): CE(y, s) + CE(t, s) = 2 CE((y + t) / 2, s)."""
    from open_clip.loss import DistillClipLoss

    torch.manual_seed(0)
    fi, ft = (F.normalize(torch.randn(8, 16), dim=-1).requires_grad_() for _ in range(2))
    ti, tt = (F.normalize(torch.randn(8, 16), dim=-1) for _ in range(2))
    scale, t_scale = torch.tensor(7.0), torch.tensor(12.0)
    loss = PSDLoss(constant_schedule(0.5, 1.0), 1.0)
    teacher = loss.get_logits(ti, tt, t_scale)
    ours = loss(fi, ft, scale, step=0, teacher_logits=teacher)["contrastive_loss"]
    theirs = DistillClipLoss()(fi, ft, scale, ti, tt, t_scale, output_dict=True)
    assert torch.allclose(2 * ours, theirs["contrastive_loss"] + theirs["distill_loss"], rtol=1e-5)
    g_ours = torch.autograd.grad(2 * ours, [fi, ft])
    g_theirs = torch.autograd.grad(theirs["contrastive_loss"] + theirs["distill_loss"], [fi, ft])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_theirs))


def test_an_external_teacher_sees_the_students_batch_in_its_own_inputs():
    """The student's images resized to the teacher's size and re-normalised to its mean and std; its tokens padded
    or cut to the teacher's context length with the end-of-text token kept; frozen, in eval mode, no gradients."""
    from psdclip.train.models import build_model
    from psdclip.train.teacher import wrap_teacher

    student, _, _, tok = build_model("rn-small")
    teacher = build_model("tiny")[0]
    wrapped = wrap_teacher(teacher, student)
    assert wrapped.image_size == (64, 64) and wrapped.context_length == 32
    raw = torch.rand(2, 3, 48, 48)
    s_mean, s_std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    x = (raw - s_mean.view(1, 3, 1, 1)) / s_std.view(1, 3, 1, 1)
    back = x * wrapped.scale + wrapped.shift  # same mean/std here: the identity
    assert torch.allclose(back, x, atol=1e-6)
    from psdclip.train.teacher import ExternalTeacher

    other = ExternalTeacher(teacher, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, tuple(s_mean.tolist()),
                            tuple(s_std.tolist()))
    assert torch.allclose(x * other.scale + other.shift, (raw - 0.5) / 0.25, atol=1e-5)
    long = tok(["a photo of " + "very " * 30 + "red circles"])  # the student's context (16), EOT last
    real = wrapped.context_length
    for ctx in (8, 200):
        wrapped.context_length = ctx
        adapted = wrapped.adapt_text(long)
        assert adapted.shape == (1, ctx)
        if ctx < long.shape[1]:  # cut: the end-of-text token moved to the last place open_clip pools at
            assert adapted.argmax(dim=-1).item() == ctx - 1 and torch.equal(adapted[:, :-1], long[:, :ctx - 1])
        else:  # padded with zeros after the student's tokens
            assert torch.equal(adapted[:, :long.shape[1]], long) and not adapted[:, long.shape[1]:].any()
    wrapped.context_length = real
    wrapped.train()
    assert not wrapped.training and not wrapped.model.training
    out = wrapped(x, long)
    assert out["image_features"].shape[0] == 2 and not out["image_features"].requires_grad
    assert all(not p.requires_grad for p in wrapped.parameters())

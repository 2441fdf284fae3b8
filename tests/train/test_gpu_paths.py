"""The CUDA paths' logic that runs on a CPU: device resolution per local rank, fp32 logits under autocast, the PSD
row mask drawn once a step, the service's GPU per worker. (GPU-only checks are marked `gpu`.)"""
import pytest
import torch
import torch.nn.functional as F

from psdclip.train.loading import resolve_device
from psdclip.train.losses import CLIPLoss, PSDLoss, constant_schedule


def test_cuda_without_an_index_is_this_ranks_gpu():
    """`--device cuda` became torch.device("cuda"), which torch.cuda.set_device refuses, and put every rank of an
    index build on GPU 0."""
    assert resolve_device("cuda", 0) == torch.device("cuda", 0)
    assert resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3) == torch.device("cuda", 1)  # named in full: as named
    assert resolve_device("cpu", 3) == torch.device("cpu")


@pytest.mark.parametrize("loss_cls", [CLIPLoss, PSDLoss])
def test_logits_are_fp32_under_bf16_autocast(loss_cls):
    """At a logit scale of 100, bf16 logits round in steps of 0.5: the loss computes them in fp32."""
    torch.manual_seed(0)
    fi, ft = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    loss = loss_cls() if loss_cls is CLIPLoss else loss_cls(constant_schedule(0.5))
    scale = torch.tensor(100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        li, lt = loss.get_logits(fi.bfloat16(), ft.bfloat16(), scale)
    assert li.dtype == torch.float32 and lt.dtype == torch.float32
    exact = scale * fi.bfloat16().float() @ ft.bfloat16().float().T  # the bf16 features, multiplied in fp32
    assert torch.allclose(li, exact, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = (scale * fi.bfloat16() @ ft.bfloat16().T)  # what it was: a bf16 product
    assert rounded.dtype == torch.bfloat16 and not torch.allclose(rounded.float(), exact, atol=1e-4)


def test_the_psd_row_mask_is_drawn_once_a_step():
    loss = PSDLoss(constant_schedule(0.5, rho=0.5), seed=3)
    first = loss.row_mask(7, 64, 64, 0.5, torch.device("cpu"))
    assert loss.row_mask(7, 64, 64, 0.5, torch.device("cpu")) is first  # the next micro-batch of the step
    again = PSDLoss(constant_schedule(0.5, rho=0.5), seed=3).row_mask(7, 64, 64, 0.5, torch.device("cpu"))
    assert torch.equal(again, first) and 0 < int(first.sum()) < 64
    assert not torch.equal(loss.row_mask(8, 64, 64, 0.5, torch.device("cpu")), first)


def test_each_service_worker_takes_its_own_gpu(tmp_path):
    from psdclip.index.reload import worker_slot
    from psdclip.index.launch import worker_device

    assert [worker_slot(str(tmp_path)) for _ in range(3)] == [0, 1, 2]
    assert [worker_device("cuda", s, 2) for s in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_device("cuda:1", 0, 2) == "cuda:1" and worker_device("cpu", 1, 2) == "cpu"
    assert worker_device("cuda", 1, 0) == "cuda"


def test_the_gpu_search_asks_faiss_for_at_most_2048():
    from psdclip.index import ann

    assert ann.GPU_MAX_K == 2048 and ann.gpu_number("cuda:3") == 3 and ann.gpu_number("cuda") == 0
    assert not ann.on_gpu(ann.build(torch.randn(64, 8).numpy(), "Flat"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_searcher_on_cuda_caps_k_and_uses_its_own_gpu():
    import numpy as np

    from psdclip.index import ann

    xb = np.random.default_rng(0).normal(size=(5000, 16)).astype("float32")
    index = ann.to_gpu(ann.build(xb, "Flat"), "cuda:0")
    if not ann.on_gpu(index):
        pytest.skip("faiss-gpu is not installed")
    _, ids = index.search(xb[:2], ann.GPU_MAX_K)
    assert ids.shape == (2, ann.GPU_MAX_K)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_faiss_gpu_beside_torchs_cuda_in_one_process():
    """Issue 32 (12): faiss-gpu-cu12 brings CUDA 12's runtime and cuBLAS beside torch's own CUDA (13 for torch's
    cu130 builds). Their libraries have different sonames (libcudart.so.12 / .13), so both load in one process;
    this checks that, in both import orders' worst case (torch has initialised CUDA first), faiss's GPU search
    agrees with its CPU search and torch's CUDA still computes afterwards."""
    import numpy as np

    a = torch.randn(256, 256, device="cuda")
    before = (a @ a).sum().item()
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU support here (faiss-cpu is installed)")
    xb = np.random.default_rng(0).normal(size=(20000, 32)).astype("float32")
    cpu = faiss.IndexFlatIP(32)
    cpu.add(xb)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    d_cpu, i_cpu = cpu.search(xb[:64], 10)
    d_gpu, i_gpu = gpu.search(xb[:64], 10)
    assert (i_cpu[:, 0] == i_gpu[:, 0]).all() and np.allclose(d_cpu, d_gpu, rtol=1e-3, atol=1e-3)
    assert (a @ a).sum().item() == pytest.approx(before, rel=1e-4)


def test_fp16_loss_scaling_skips_an_overflowed_step_and_otherwise_equals_an_unscaled_one():
    """--precision amp (fp16 + GradScaler): the gradients are unscaled before clipping and the step, so a taken step
    is the unscaled one; a step whose gradients overflowed is skipped (weights untouched) and the scale lowered."""
    from psdclip.train.loop import optimizer_step

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    ref, model = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    model.load_state_dict(ref.state_dict())
    opt_ref, opt = torch.optim.AdamW(ref.parameters(), lr=0.1), torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ref(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt_ref.step()
    scaler.scale(model(x).pow(2).sum()).backward()
    logs = {}
    assert optimizer_step(model, opt, scaler, 0.5, logs) and float(logs["grad_norm"]) < 1e6
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).pow(2).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    assert not optimizer_step(model, opt, scaler, 0.5, {})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 9
    plain = torch.amp.GradScaler("cpu", enabled=False)  # bf16 / fp32: no scaling, every step taken
    assert optimizer_step(model, opt, plain, 0.0, {})


def test_nccl_on_a_cpu_rank_is_one_line_and_gloo_shares_a_device(monkeypatch, tmp_path):
    """--dist-backend (open_clip's flag): nccl needs CUDA ranks (said in one line, before any process group is
    made); gloo is what lets two ranks share one GPU, as benchmarks/gpu_check.py (c) runs them."""
    from psdclip.core.errors import InputError
    from psdclip.train.config import TrainConfig
    from psdclip.train.distributed import setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), device="cpu", dist_backend="nccl")
    with pytest.raises(InputError, match="--dist-backend nccl needs CUDA devices"):
        setup_distributed(cfg)
    with pytest.raises(InputError, match="one of"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), dist_backend="mpi")

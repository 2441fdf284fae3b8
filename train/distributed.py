"""Distributed set-up and the decisions ranks take together: the process group (NCCL on GPU, gloo on CPU) and each
rank's device, whether a step's loss is finite everywhere, and whether a stop signal came to any rank."""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from ..core.errors import InputError
from .config import TrainConfig
from .loading import fast_cuda_math, resolve_device


def setup_distributed(cfg: TrainConfig):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        fast_cuda_math(device)
    if world > 1 and not dist.is_initialized():
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise InputError(f"--dist-backend nccl needs CUDA devices; this rank runs on {device}")
        dist.init_process_group(backend,
                                timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    return rank, world, device


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler or torchrun ending the job) finish the current step, write a
    checkpoint and stop; the ranks of a distributed run agree on it (one small all-reduce a step) so that none is
    left waiting. The loader workers ignore SIGINT, which a terminal sends to the whole process group (see
    data._worker_init)."""

    def __init__(self):
        import signal
        import threading

        self.name = ""
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        import signal

        self.name = signal.Signals(signum).name

    def wait(self, seconds: float) -> bool:
        """Whether a stop signal has come, waiting up to `seconds` for one sent at the same time as what ended
        a worker."""
        deadline = time.time() + seconds
        while not self.name and time.time() < deadline:
            time.sleep(0.05)
        return bool(self.name)

    def agreed(self, world: int, device) -> bool:
        if world == 1:
            return bool(self.name)
        flag = torch.tensor([1.0 if self.name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.name:
            self.name = "a signal on another rank"
        return bool(flag.item())

    def restore(self):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def step_flags(total: torch.Tensor, stop: bool, world: int) -> tuple[bool, bool]:
    """(the loss is finite on every rank, a stop signal came to some rank): one all-reduce (MIN over [finite,
    -stop]) and one device -> host copy a step, where there were two of each."""
    flags = torch.stack([torch.isfinite(total.detach()).all().to(torch.float32),
                         torch.tensor(-1.0 if stop else 0.0, device=total.device)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite, stop_flag = flags.tolist()
    return finite > 0, stop_flag < 0


def all_finite(total: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank: decided together (one all-reduce), so that all ranks skip or
    stop at the same step instead of one leaving the others waiting in the next collective."""
    ok = torch.isfinite(total.detach()).all().to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows of `t` (same shape on each), concatenated in rank order as the loss gathers features; no
    gradient. `t` itself with one process."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)

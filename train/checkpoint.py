"""The checkpoint format, written and read here alone: what a training checkpoint holds (`Checkpoint`, a typed
payload), how it is written (a temporary name renamed into place, so a crash never leaves a half-written step_*.pt;
the newest K kept; `latest` names the newest complete one; rank 0 writes on a background thread) and read
(torch.load(weights_only=True); the newest loadable one on resume). Loading a model for inference from it is
loading.py."""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import InputError
from ..core.io import atomic_path, write_text
from .config import changed_on_resume
from .plots import plot_run

_STEP = re.compile(r"step_(\d+)\.pt$")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Checkpoint:
    """A training checkpoint's contents (the keys of its file). `model_cfg` and `config` are JSON strings (a model
    from a JSON config file is known from the checkpoint itself; `config` is the resolved TrainConfig)."""
    model: dict
    step: int
    model_arch: str
    model_cfg: str | None = None
    loss: str | None = None
    config: str | None = None
    optimizer: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    data: dict = dataclasses.field(default_factory=dict)  # {"position": per-reader positions, "world_size", "workers"}
    teacher: dict | None = None  # PSD's EMA / snapshot teacher
    path: str = ""  # where it was read from (not written)

    @classmethod
    def read(cls, path: str) -> "Checkpoint":
        state = load(path)
        if not isinstance(state, dict) or "model_arch" not in state or "model" not in state:
            raise InputError(f"{path}: not a psdclip training checkpoint")
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(**{k: v for k, v in state.items() if k in names}, path=path)

    def payload(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        return {k: v for k, v in out.items() if v is not None}

    def model_config(self) -> dict | None:
        return json.loads(self.model_cfg) if self.model_cfg else None

    def train_config(self) -> dict:
        return json.loads(self.config) if self.config else {}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # a job may resume with fewer (or more) visible devices
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def save(ckpt_dir: str, step: int, payload: dict, keep: int) -> str:
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"step_{step:06d}.pt")
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    write_text(os.path.join(ckpt_dir, "latest"), os.path.basename(final) + "\n")
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        os.remove(old)
    return final


def list_checkpoints(ckpt_dir: str) -> list[str]:
    files = [p for p in glob.glob(os.path.join(ckpt_dir, "step_*.pt")) if _STEP.search(p)]
    return sorted(files, key=lambda p: int(_STEP.search(p).group(1)))


def clean_partial(ckpt_dir: str) -> None:
    for p in glob.glob(os.path.join(ckpt_dir, "*.tmp-*")):
        os.remove(p)


def load(path: str, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such checkpoint") from None
    except Exception as err:  # pylint: disable=broad-except
        raise InputError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None


def find_latest(ckpt_dir: str) -> Checkpoint | None:
    """The newest checkpoint that loads (a damaged one is reported and passed over)."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return Checkpoint.read(path)
        except InputError as err:
            log.warning(f"psdclip: warning: {err}; trying an older checkpoint")
    return None


def checkpoint_path(run_or_file: str) -> str:
    """A checkpoint file as given, or a run directory's newest complete checkpoint (checkpoints/latest)."""
    if os.path.isfile(run_or_file):
        return run_or_file
    ckpt_dir = os.path.join(run_or_file, "checkpoints")
    files = list_checkpoints(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not files:
        raise InputError(f"{run_or_file}: no checkpoint found (neither a file nor a run with checkpoints/)")
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return os.path.join(ckpt_dir, name)
    return files[-1]




# ---- writing during training ---------------------------------------------------------------------------

class BackgroundWriter:
    """Rank 0 writes checkpoints and draws plots on one background thread, one job at a time, so that neither its
    training nor the other ranks wait for the disk (they used to wait at a barrier under the process-group
    timeout). A job's payload is a host-memory snapshot taken when it is submitted. An error in a job is raised
    at the next submit or wait."""

    def __init__(self):
        self.thread = None
        self.error: BaseException | None = None

    def submit(self, job) -> None:
        import threading

        self.wait()
        self.thread = threading.Thread(target=self._run, args=(job,), name="psdclip-checkpoint", daemon=True)
        self.thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as err:  # pylint: disable=broad-except  (re-raised in the training thread)
            self.error = err

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def snapshot(obj):
    """A copy in host memory of a (nested) state dict: what the next optimizer step changes is not what is written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def write(state, step: int, position: dict, plot: bool = True) -> None:
    """Every rank's data position gathered (the one collective); rank 0 snapshots model, optimizer and RNG
    states and hands the write (and, when `plot`, the run's plots) to its background writer. `state`: the loop's
    TrainState."""
    from .models import model_config, resolve_model_name  # lazy: open_clip, slow to import

    cfg, world = state.cfg, state.world
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, position)
        merged = {}
        for p in gathered:
            merged.update(p)
        position = merged
    if state.teacher is not None:  # what PSD's teacher keeps beside the checkpoint (the bank: this rank's copy)
        kept = {int(_STEP.search(p).group(1)) for p in list_checkpoints(state.ckpt_dir)} | {step}
        state.teacher.save(step, set(sorted(kept)[-cfg.keep:]))
    if state.rank == 0:
        state.writer.wait()  # one write in flight at most (and its error, if any, surfaces here)
        payload = snapshot(Checkpoint(
            model=state.model.state_dict(), optimizer=state.optimizer.state_dict(), scaler=state.scaler.state_dict(),
            step=step, rng=rng_state(), data={"position": position, "world_size": world, "workers": cfg.workers},
            model_arch=resolve_model_name(cfg.model), model_cfg=json.dumps(model_config(cfg.model)), loss=cfg.loss,
            config=json.dumps(dataclasses.asdict(cfg)),
            teacher=state.teacher.state_dict() if state.teacher is not None else None).payload())

        def job():
            save(state.ckpt_dir, step, payload, cfg.keep)
            if plot:
                plot_run(cfg.out)
            if state.remote is not None:  # --remote-sync: after the file and its plots, in this background job
                state.remote.push(cfg.out, cfg.keep, plots=plot)

        state.writer.submit(job)


# ---- resuming ------------------------------------------------------------------------------------------

def truncate_metrics(path: str, step: int) -> None:
    """Keep the rows up to the step training continues from: after a fall-back to an older checkpoint (the newest
    was damaged) or a fresh start, the steps after it are trained again and must not be logged twice."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped
            continue
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def choose_latest(ckpt_dir: str, rank: int, world: int) -> tuple[str | None, Checkpoint | None]:
    """The checkpoint every rank resumes from: rank 0 clears half-written files and picks the newest that loads,
    and broadcasts its path (ranks racing on os.remove, or a rank of a node-local --out starting at step 0 while
    the others resume, was the alternative). Every rank must see that file: a --out some node lacks is one line,
    raised on every rank together. Returns (its path, and on rank 0 the checkpoint as loaded to choose it)."""
    path = found = None
    if rank == 0 and os.path.isdir(ckpt_dir):
        clean_partial(ckpt_dir)
        found = find_latest(ckpt_dir)
        path = found.path if found else None
    if world > 1 and dist.is_initialized():
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
        seen = [None] * world
        dist.all_gather_object(seen, path is None or os.path.isfile(path))
        if not all(seen):
            missing = [r for r, ok in enumerate(seen) if not ok]
            raise InputError(f"--out {os.path.dirname(ckpt_dir)}: rank(s) {', '.join(map(str, missing))} cannot see "
                             f"{path}, the checkpoint rank 0 resumes from: --out must be a folder every node shares "
                             f"(or synced to each)")
    return path, found


def resume(cfg, ckpt_dir, model, optimizer, scaler, world: int, rank: int = 0) -> Checkpoint | None:
    """Load the checkpoint a run continues from (--resume auto: the run folder's newest loadable one; a file: that one)
    into model, optimizer, scaler and the RNGs; its data position is dropped when ranks or workers changed."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        path, state = choose_latest(ckpt_dir, rank, world)
        if path is None:
            return None
        state = state or Checkpoint.read(path)  # (rank 0 loaded it already to choose it)
    else:
        state = Checkpoint.read(cfg.resume)
    from .models import resolve_model_name  # lazy: open_clip, slow to import

    arch = resolve_model_name(cfg.model)
    if state.model_arch != arch:
        raise InputError(f"{state.path}: checkpoint is for model {state.model_arch!r}, not {arch!r}")
    changed = changed_on_resume(state.train_config(), cfg)
    if changed:
        raise InputError(f"--out {cfg.out}: its run was trained with other settings ({'; '.join(changed)}); resume "
                         f"with the same ones (only how it runs, logs and stops may change, and --steps), or use a "
                         f"new --out")
    try:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{state.path}: incompatible checkpoint ({str(err).splitlines()[0][:200]})") from None
    scaler.load_state_dict(state.scaler or {})
    set_rng_state(state.rng)
    data = state.data or {}
    position = data.get("position", {})
    if data.get("world_size") != world or data.get("workers") != cfg.workers:
        seen = sum(int(p.get("samples", 0)) for p in position.values())
        log.warning(f"psdclip: warning: ranks or workers changed since the checkpoint ({data.get('world_size')} x "
                    f"{data.get('workers')} -> {world} x {cfg.workers}); the data stream restarts its epoch, so the "
                    f"{seen:,} samples of it already seen are seen again")
        position = {}
    log.info(f"psdclip: resuming from {state.path} (step {state.step})")
    state.data = {**data, "position": position}
    return state

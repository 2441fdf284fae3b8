"""psdclip demo: the embedded default, end to end on synthetic data served over 127.0.0.1."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from psdclip.pipeline.errors import InputError


@dataclass
class DemoConfig:
    """psdclip demo: synthetic source -> loopback server -> real pipeline (Dask + img2dataset) -> dataset."""

    out: str = field(default="demo-out", metadata={"help": "directory for everything the demo writes"})
    n: int = field(default=2000, metadata={"help": "synthetic training pairs"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    workers: int = field(default=2, metadata={"help": "Dask worker processes"})

    def __post_init__(self):
        if self.n < 10:
            raise InputError(f"--n must be >= 10, got {self.n}")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")


def _step(msg: str) -> None:
    print(f"\n==> {msg}", file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig) -> int:
    from psdclip.pipeline.build import build
    from psdclip.pipeline.config import BuildConfig, SynthConfig
    from psdclip.pipeline.dataset import format_stats
    from psdclip.pipeline.serve import serving
    from psdclip.pipeline.synth import generate, write_url_list

    t0 = time.time()
    out = os.path.abspath(cfg.out)
    src = os.path.join(out, "synth")
    _step(f"generating {cfg.n:,} synthetic image-caption pairs with noisy captions in {src}")
    if not os.path.isfile(os.path.join(src, "synth.json")):
        generate(SynthConfig(out=src, n=cfg.n, seed=cfg.seed, heldout=200))
    with serving(src) as base_url:
        _step(f"serving them on {base_url}; building the dataset through Dask + img2dataset")
        urls = write_url_list(src, base_url, name="urls-demo.csv")
        stats = build(BuildConfig(inputs=[urls], out=os.path.join(out, "dataset"), image_size=64,
                                  shard_size=max(100, cfg.n // 8), processes_count=cfg.workers, thread_count=16,
                                  subsets=["0.01", "0.1", "1.0"], encode_quality=90))
    print(format_stats(stats))
    print(f"\ndemo finished in {time.time() - t0:.0f} s; dataset in {os.path.join(out, 'dataset')}")
    return 0

"""The typed configs of `psdclip eval` and `psdclip compare` (one dataclass each, a help text per field, validated on
creation), and the name of a suite's result file. Light: no torch or open_clip, so the CLI builds its options at
once."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from ..core.errors import InputError

SUITE_KINDS = ("synthetic", "imagefolder", "imagenet", "retrieval", "wds")


@dataclass
class EvalConfig:
    """psdclip eval: evaluate a run or checkpoint on a suite; writes RUN/eval/<suite>.json."""

    target: str = field(default="", metadata={"help": "run directory or checkpoint file", "positional": True,
                                              "metavar": "RUN_OR_CHECKPOINT"})
    suite: str = field(default="", metadata={"help": "synthetic:DIR, imagefolder:PATH, imagenet:PATH, retrieval:FILE or "
                                                     "wds:DIR (CLIP_benchmark's local wds_* layout)"})
    split: Literal["all", "val", "test"] = field(default="all", metadata={
        "help": "synthetic suite: all held-out scenes, or the validation (scene id %% 4 == 0) or test (the rest) "
                "split; choose settings on val, report test"})
    json: bool = field(default=False, metadata={"help": "print the result as JSON"})
    format: Literal["psdclip", "clip_benchmark"] = field(default="psdclip", metadata={
        "help": "also write CLIP_benchmark's result JSON (dataset, model, pretrained, task, metrics: acc1, acc5, "
                "mean_per_class_recall, image/text_retrieval_recall@k; language), one file per dataset and task in "
                "RUN/eval/clip_benchmark/, which its result tooling reads"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    workers: int = field(default=2, metadata={"help": "image loading worker processes"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})

    def __post_init__(self):
        if not self.target:
            raise InputError("RUN_OR_CHECKPOINT is required")
        kind = self.suite.split(":", 1)[0]
        if kind not in SUITE_KINDS or ":" not in self.suite:
            raise InputError(f"--suite {self.suite!r}: expected synthetic:DIR, imagefolder:PATH, imagenet:PATH, "
                             f"retrieval:FILE or wds:DIR (CLIP_benchmark's local webdataset layout)")
        if self.format not in ("psdclip", "clip_benchmark"):
            raise InputError(f"--format {self.format!r}: expected psdclip or clip_benchmark")
        if self.split != "all" and kind != "synthetic":
            raise InputError(f"--split {self.split}: only the synthetic suite has val/test splits")


@dataclass
class CompareConfig:
    """psdclip compare: put runs side by side on their evaluations (RUN/eval/*.json)."""

    runs: list[str] = field(default_factory=list, metadata={"help": "run directories (the first is the baseline)",
                                                            "positional": True, "metavar": "RUN"})
    out: str = field(default="", metadata={"help": "folder for compare.md, compare.json and compare.png "
                                                   "(default: beside the first run)"})
    reference: list[str] = field(default_factory=list, metadata={
        "help": "reference runs for the effective-robustness fit (default: the given runs trained with clip)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples"})

    def __post_init__(self):
        if len(self.runs) < 2:
            raise InputError("psdclip compare needs at least two runs")


def result_name(suite: str, split: str = "all") -> str:
    """RUN/eval/<name>.json: `synthetic` for the synthetic suite (`synthetic-val`, `synthetic-test` for a split),
    else the kind and the folder or file name (imagenet-imagenet-r, retrieval-flickr30k_test), so that each data
    set keeps its own result."""
    kind, arg = suite.split(":", 1)
    if kind == "synthetic":
        return kind if split == "all" else f"{kind}-{split}"
    stem = os.path.splitext(os.path.basename(os.path.normpath(arg)))[0] if kind == "retrieval" else \
        os.path.basename(os.path.normpath(arg))
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stem or "root")

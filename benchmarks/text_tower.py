"""The service's text tower, eager PyTorch against TorchScript traces (train.models.TracedText), side by side in one
run, recorded in BENCHMARKS.md: milliseconds per batch of distinct captions (tokenizer excluded) at batch sizes 1,
8 and 32, on the demo index's model with 1 CPU thread (the service's default), both alone and while another
Python thread runs pure-Python work (as the service's event loop does): eager PyTorch takes the GIL back after
every operator, a trace holds it only to start.

    python benchmarks/text_tower.py [--index bench-out/demo/index] [--repeats 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402
from service import demo_index  # noqa: E402


BUSY_REPEATS = 10  # eager batches take up to a second each beside a busy thread


def spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1


def per_batch_ms(fn, tokens, repeats: int) -> float:
    fn(tokens)
    t = time.perf_counter()
    for _ in range(repeats):
        fn(tokens)
    return (time.perf_counter() - t) / repeats * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--index", default="bench-out/demo/index")
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    _, idx = demo_index(args.index, ap.get_default("index"))
    import pyarrow.feather as feather
    import torch

    from psdclip.index.searcher import Searcher
    from psdclip.train.models import TracedText, encode_text

    torch.set_num_threads(1)
    s = Searcher(idx)
    caps = feather.read_table(os.path.join(idx, "metadata.arrow")).column("caption").to_pylist()
    traced = TracedText(s.model)
    traced.warm(s.tokenizer, "cpu")
    runtimes = {"eager": lambda t: encode_text(s.model, t), "torchscript": traced}
    rows = []
    with torch.no_grad():
        for busy in (False, True):
            stop = threading.Event()
            spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
            if busy:
                spinner.start()
            try:
                for batch in (1, 8, 32):
                    tokens = s.tokenizer([f"{caps[i]} {i}" for i in range(batch)])
                    ms = {name: per_batch_ms(fn, tokens, BUSY_REPEATS if busy else args.repeats)
                          for name, fn in runtimes.items()}
                    rows.append((busy, batch, ms["eager"], ms["torchscript"]))
                    print(rows[-1], flush=True)
            finally:
                stop.set()
                if busy:
                    spinner.join()
    table = "\n".join(f"| {'yes' if busy else 'no'} | {b} | {e:.3f} | {t:.3f} | {e / t:.2f}x |"
                      for busy, b, e, t in rows)
    body = (f"The demo index's text tower ({s.info['model_arch']}), 1 CPU thread, distinct captions, tokenizer "
            f"excluded; milliseconds per batch, eager PyTorch (`encode_text`) against the traces the service uses "
            f"(`TracedText`, warmed), {args.repeats} batches each ({BUSY_REPEATS} with the busy thread). \"Busy "
            f"thread\": another Python thread loops in pure Python meanwhile, as the service's event loop does.\n\n"
            f"| busy thread | batch | eager ms | torchscript ms | eager / torchscript |\n|---|---|---|---|---|\n"
            f"{table}\n")
    record("text-tower", "Service: the text tower, eager vs TorchScript", body)


if __name__ == "__main__":
    main()

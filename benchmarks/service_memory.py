"""Service memory under large-image load (issue 16, item 7), recorded in BENCHMARKS.md: `psdclip serve` on the demo's
index; 12 clients at once each send a 6,300 x 6,300 PNG (~40 M pixels, under the 40-Mpx limit, ~116 KB on the
wire) as a base64 image query, three rounds; the service's RSS is sampled every 20 ms from /proc. Goal: peak RSS
at most 1.5 GB above the idle RSS, and none of the requests fails with a 5xx (a 503 "too many large images" under
the decode slots is an answer, not a failure).

    python benchmarks/service_memory.py [--index bench-out/demo/index] [--clients 12] [--rounds 3]
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _record import record  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="bench-out/demo/index")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.index, "index.json")):
        raise SystemExit(f"{args.index}: not a psdclip index (run `python benchmarks/demo.py` first)")
    import requests
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), (200, 30, 30)).save(buf, "PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "k": 5}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "psdclip")
    proc = subprocess.Popen([exe, "serve", args.index, "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(base + "/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        requests.post(base + "/search", json={"text": "warm up", "k": 1})
        time.sleep(1)
        idle = rss_mb(proc.pid)
        peak, done = idle, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        codes: list[int] = []
        t = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            for _ in range(args.rounds):
                codes += list(pool.map(lambda _: requests.post(base + "/search", json=body, timeout=300).status_code,
                                       range(args.clients)))
        seconds = time.time() - t
        time.sleep(1)
        after = rss_mb(proc.pid)
        done.set()
        sampler.join()
    finally:
        proc.terminate()
        proc.wait()
    counts = {c: codes.count(c) for c in sorted(set(codes))}
    print(f"idle {idle:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB, codes {counts}")
    body_md = (f"`psdclip serve` on the demo index; {args.clients} concurrent clients x {args.rounds} rounds, each a "
               f"6,300 x 6,300 PNG ({len(buf.getvalue()) / 1024:.0f} KB, 39.7 M pixels) as a base64 image query; "
               f"RSS of the service process sampled every 20 ms; {seconds:.1f} s in all.\n\n"
               f"| idle RSS | peak RSS | peak - idle | RSS 1 s after | responses |\n|---|---|---|---|---|\n"
               f"| {idle:.0f} MB | {peak:.0f} MB | **{peak - idle:.0f} MB** | {after:.0f} MB | "
               f"{', '.join(f'{n} x {c}' for c, n in counts.items())} |\n\n"
               f"Goal: peak - idle <= 1,536 MB (was 5.0 GB peak, 3.7 GB left, before large decodes were bounded "
               f"to 2 slots and decoded at reduced size), no 5xx other than 503.\n")
    record("service-memory", "Service: memory under concurrent large images", body_md)


if __name__ == "__main__":
    main()

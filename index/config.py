"""The typed configs of `psdclip index build`, `index query` and `serve`: light (no torch, faiss or
open_clip), so that the CLI builds its options without loading a model stack."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..core.errors import InputError

_SIZE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_bytes(text: str, option: str = "--max-memory") -> float:
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"{option} {text!r}: expected a size such as 512MB or 2GB")
    return float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower())


TEXT_RUNTIMES = ("torchscript", "eager")  # how a service runs the text tower (index/searcher.py)


@dataclass
class IndexBuildConfig:
    """psdclip index build: encode a dataset with a checkpoint and build a FAISS index under budgets."""

    checkpoint: str = field(default="", metadata={"help": "run directory or checkpoint file (optional with "
                                                          "--embeddings: then only embedding queries)"})
    data: str = field(default="", metadata={"help": "dataset directory to embed"})
    embeddings: str = field(default="", metadata={
        "help": "index precomputed embeddings instead of a dataset: a folder in clip-retrieval's layout "
                "(img_emb/img_emb_*.npy, optional text_emb/ and metadata/metadata_*.parquet)"})
    out: str = field(default="", metadata={"help": "index directory"})
    max_memory: str = field(default="2GB", metadata={"help": "memory budget of the index (e.g. 512MB, 2GB)"})
    max_build_memory: str = field(default="4GB", metadata={
        "help": "memory budget of the build (training sample, chunks, the index being filled); IVF indices "
                "over it are built in shards"})
    max_query_ms: float = field(default=10.0, metadata={"help": "latency budget of one query in ms"})
    factory: str = field(default="", metadata={"help": "force a faiss factory string (default: chosen under the budgets)"})
    target_recall: float = field(default=0.95, metadata={"help": "recall@k vs exact search that tuning aims for"})
    skip_damaged: bool = field(default=False, metadata={
        "help": "index what a damaged shard still holds (its undecodable or missing images left out, said in one line "
                "each and counted in index.json) instead of exit 1; without it a damaged shard's part is never kept, "
                "and a rerun after the shard is repaired embeds it whole"})
    strict: bool = field(default=False, metadata={"help": "exit 1 when the budgets cannot give --target-recall (the "
                                                          "index is still written, and index.json says what was missed)"})
    k: int = field(default=10, metadata={"help": "k of the recall measurement"})
    fp16: bool = field(default=False, metadata={"help": "store embeddings as float16"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    workers: int = field(default=2, metadata={"help": "image loading worker processes (each reads whole shards)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N] (auto under torchrun: this rank's GPU)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        if not self.out:
            raise InputError("--out is required")
        if self.embeddings and self.data:
            raise InputError("give --data (a dataset to embed) or --embeddings (vectors embedded elsewhere), not both")
        if not self.embeddings and not (self.data and self.checkpoint):
            raise InputError("--checkpoint and --data are required (or --embeddings DIR to index precomputed vectors)")
        parse_bytes(self.max_memory, "--max-memory")
        if parse_bytes(self.max_build_memory, "--max-build-memory") < 1 << 20:
            raise InputError(f"--max-build-memory {self.max_build_memory}: at least 1MB")
        if not 0 < self.target_recall <= 1 or self.k < 1 or self.max_query_ms <= 0:
            raise InputError("--target-recall must be in (0, 1], --k >= 1 and --max-query-ms > 0")


@dataclass
class QueryConfig:
    """psdclip index query: nearest neighbours of a text, an image or an embedding."""

    index: str = field(default="", metadata={"help": "index directory", "positional": True})
    text: str = field(default="", metadata={"help": "query text"})
    image: str = field(default="", metadata={"help": "query image file"})
    embedding: str = field(default="", metadata={"help": "query embedding (.npy file)"})
    k: int = field(default=10, metadata={"help": "results", "flag": "-k"})
    modality: str = field(default="image", metadata={"help": "what to search: image (images) or text (captions)"})
    dedupe: bool = field(default=False, metadata={"help": "remove near-identical results"})
    json: bool = field(default=False, metadata={"help": "print JSON"})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "largest query image (pixels)"})

    def __post_init__(self):
        if not self.index:
            raise InputError("INDEX is required")
        if sum(bool(x) for x in (self.text, self.image, self.embedding)) != 1:
            raise InputError("give exactly one of --text, --image or --embedding")
        if not 1 <= self.k <= 10_000:
            raise InputError(f"-k must be in [1, 10000], got {self.k}")
        if self.modality not in ("image", "text"):
            raise InputError(f"--modality must be image or text, got {self.modality!r}")


@dataclass
class ServeConfig:
    """psdclip serve: the retrieval service (FastAPI + uvicorn) with a web page at /."""

    indices: list[str] = field(default_factory=list, metadata={
        "help": "index directories, optionally named NAME=DIR (the first is the default)", "positional": True,
        "metavar": "INDEX"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port (0 picks a free one)"})
    max_k: int = field(default=1000, metadata={"help": "largest k a request may ask for"})
    max_body_bytes: int = field(default=8 << 20, metadata={"help": "largest request body"})
    max_text_chars: int = field(default=1000, metadata={"help": "longest query text"})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "largest query image (pixels)"})
    allowed_url_hosts: list[str] = field(default_factory=list, metadata={
        "help": "hosts that image_url queries may fetch from (default: none, image_url refused)"})
    fetch_timeout: float = field(default=10.0, metadata={"help": "seconds an image_url fetch may take in all"})
    head_timeout: float = field(default=10.0, metadata={"help": "seconds a request's head (its line and headers) may "
                                                                "take to arrive; a connection that trickles it is "
                                                                "closed (slowloris)"})
    max_connections: int = field(default=1024, metadata={"help": "connections and requests served at once per "
                                                                 "process; beyond, 503 at once"})
    body_timeout: float = field(default=30.0, metadata={"help": "seconds a request body may take to arrive (a "
                                                                "client that stops sending gets 408)"})
    api_key: str = field(default="", metadata={"help": "key required by the admin endpoints (X-API-Key); "
                                                        "default: from PSDCLIP_API_KEY, else admin is off"})
    device: str = field(default="cpu", metadata={"help": "device of the query encoder"})
    text_cache: int = field(default=10_000, metadata={"help": "query texts whose embeddings are kept (LRU; 0: off)"})
    workers: int = field(default=1, metadata={
        "help": "service processes sharing the port and the memory-mapped indices (each holds its own query "
                "encoder; /admin/reload reaches every one)"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads of each process' model and index search (0: torch's and faiss' default, one per "
                "core). Queries come in small batches: with more threads, idle ones spin and take the CPU the "
                "event loop needs"})
    text_runtime: str = field(default="torchscript", metadata={
        "help": "how the text tower runs: torchscript (traces that release the GIL while they run) or eager"})

    def __post_init__(self):
        if not self.indices:
            raise InputError("give at least one INDEX directory")
        if not 1 <= self.workers <= 64:
            raise InputError(f"--workers must be in [1, 64], got {self.workers}")
        if not 1 <= self.max_k <= 100_000:
            raise InputError(f"--max-k must be in [1, 100000], got {self.max_k}")
        if not 0 < self.head_timeout <= 300:
            raise InputError(f"--head-timeout must be in (0, 300] seconds, got {self.head_timeout}")
        if not 1 <= self.max_connections <= 1_000_000:
            raise InputError(f"--max-connections must be in [1, 1000000], got {self.max_connections}")
        if not 0 < self.body_timeout <= 600:
            raise InputError(f"--body-timeout must be in (0, 600] seconds, got {self.body_timeout}")
        if not 0 < self.fetch_timeout <= 300:
            raise InputError(f"--fetch-timeout must be in (0, 300] seconds, got {self.fetch_timeout}")
        if not 0 <= self.threads <= 1024:
            raise InputError(f"--threads must be in [0, 1024], got {self.threads}")
        if self.text_runtime not in TEXT_RUNTIMES:
            raise InputError(f"--text-runtime must be torchscript or eager, got {self.text_runtime!r}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in [0, 65535], got {self.port}")

    def named(self) -> dict[str, str]:
        out = {}
        for spec in self.indices:
            name, _, path = spec.partition("=") if "=" in spec else (os.path.basename(os.path.normpath(spec)), "", spec)
            if name in out:
                raise InputError(f"index name {name!r} given twice")
            out[name] = path
        return out

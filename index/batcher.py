"""The query batcher: concurrent queries answered together, one text forward pass and one index call a batch."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Optional

import numpy as np


def set_threads(n: int) -> None:
    """n CPU threads for torch and faiss in this process (0: leave their defaults)."""
    if n:
        import faiss
        import torch

        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)


class _Query(NamedTuple):
    future: Any
    searcher: Any
    k: int
    modality: str
    dedupe: bool
    text: Optional[str]
    image: Any
    embedding: Optional[list]


class Batcher:
    """Answers concurrent queries together: requests queue while a batch runs, and the next batch encodes all
    waiting texts in one forward pass and searches all waiting vectors in one index call, on one worker thread
    (the model is not shared between threads). An idle service answers a lone query at once; no waiting."""

    def __init__(self, max_batch: int = 64, sizes=None, threads: int = 0):
        self.max_batch, self.sizes = max_batch, sizes
        self.pending: list[_Query] = []
        self.running = False
        # OpenMP's thread count is per calling thread: faiss's (and its BLAS') is set in the thread that searches
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="psdclip-query", initializer=set_threads,
                                           initargs=(threads,))

    async def search(self, searcher, k, modality, dedupe, text=None, image=None, embedding=None) -> list[dict]:
        loop = asyncio.get_running_loop()
        query = _Query(loop.create_future(), searcher, k, modality, dedupe, text, image, embedding)
        self.pending.append(query)
        if not self.running:
            self.running = True
            loop.create_task(self._drain(loop))
        return await query.future

    async def _drain(self, loop):
        try:
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                if self.sizes is not None:
                    self.sizes.observe(len(batch))
                outcomes = await loop.run_in_executor(self.executor, self._answer, batch)
                for q, outcome in zip(batch, outcomes):
                    if not q.future.done():
                        (q.future.set_exception if isinstance(outcome, Exception) else q.future.set_result)(outcome)
        finally:
            self.running = False

    @staticmethod
    def _answer(batch: list[_Query]) -> list:
        """One result list or one exception per query; a bad query does not fail the others."""
        out: list = [None] * len(batch)
        vectors: dict = {}
        groups: dict = {}
        for j, q in enumerate(batch):
            groups.setdefault(id(q.searcher), (q.searcher, []))[1].append(j)
        for s, members in groups.values():
            texts = [j for j in members if batch[j].text is not None]
            images = [j for j in members if batch[j].image is not None]
            try:
                if texts:
                    vectors.update(zip(texts, s.embed_text([batch[j].text for j in texts])))
                if images:
                    vectors.update(zip(images, s.embed_images([batch[j].image for j in images])))
            except Exception as err:  # pylint: disable=broad-except
                for j in texts + images:
                    out[j] = err
            for j in members:
                if batch[j].embedding is not None:
                    try:
                        vectors[j] = s.check_embedding(batch[j].embedding)[0]
                    except ValueError as err:
                        out[j] = err
            by_modality: dict = {}
            for j in members:
                if out[j] is None:
                    by_modality.setdefault(batch[j].modality, []).append(j)
            for modality, js in by_modality.items():
                try:
                    results = s.search_vectors(np.stack([vectors[j] for j in js]), [batch[j].k for j in js], modality,
                                               [batch[j].dedupe for j in js])
                    for j, r in zip(js, results):
                        out[j] = r
                except Exception as err:  # pylint: disable=broad-except
                    for j in js:
                        out[j] = err
        return out

"""The transformers engine: a worker thread that batches waiting requests over ``HFBackend``.

Requests wait in a FIFO. The worker takes everything waiting (up to
``max_batch_size``), groups requests whose sampling settings are equal, and runs
each group as one ``HFBackend.generate`` call (left-padded batch). Requests
that arrive meanwhile form the next batch. One thread owns the model, so the
event loop never blocks on a forward pass and seeds stay per batch. A streaming
request's tokens go to its ``TextDeltas`` as the batch's decoding loop chooses them,
and its deltas to the event loop at once: the first chunk leaves before the batch ends.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import astuple, dataclass

from ...backends.hf import HFBackend, RequestsFailed
from ...inputs import EncodedPrompt, InputError
from ...sampling import Completion, SamplingConfig
from ...streaming import Delta, TextDeltas
from . import PromptEncoder

log = logging.getLogger("mmfuse.server")


@dataclass
class _Job:
    encoded: EncodedPrompt
    sampling: SamplingConfig
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue | None = None  # a streaming request's deltas (None when the batch is over)
    texts: list[TextDeltas] | None = None  # one per choice, fed from the worker thread

    def send(self, delta: Delta | None) -> None:
        """From the worker thread: hand a delta (None: the end) to the event loop."""
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, delta)


def _key(job: "_Job") -> tuple:
    """Requests with equal keys run as one batch. A seeded sampled request runs alone: the seed seeds the
    whole batch, so its answer would otherwise depend on which requests arrived beside it."""
    s = job.sampling
    alone = (id(job),) if s.seed is not None and not s.greedy else ()
    return tuple(_hashable(v) for v in astuple(s)) + alone


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(value) if isinstance(value, list) else value


class HFEngine:
    """``HFBackend`` behind a batching queue (see module docstring)."""

    name = "hf"
    DEFAULT_BATCH = 32

    def __init__(self, backend: HFBackend, max_batch_size: int = DEFAULT_BATCH, on_batch=None):
        self.backend = backend
        # the event loop's own copy: a fast tokenizer is not to be shared with the worker thread
        self.tokenizer = copy.deepcopy(backend.tokenizer)
        self.specs = backend.specs
        self.max_model_len = backend.max_model_len
        self.vocab_size = backend.checkpoint.vocab_size
        self.encode = PromptEncoder(backend.checkpoint, backend.prompt_limit)
        self._worker_tokenizer = copy.deepcopy(backend.tokenizer)  # streaming jobs' decoding, on the worker
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch  # called with (requests, seconds) after each batch, from the worker thread
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mmfuse-batcher", daemon=True)
        self._thread.start()

    async def generate(self, encoded: EncodedPrompt, sampling: SamplingConfig) -> list[Completion]:
        loop = asyncio.get_running_loop()
        job = _Job(encoded, sampling, loop.create_future(), loop)
        self._jobs.put(job)
        return await job.future

    async def stream(self, encoded: EncodedPrompt, sampling: SamplingConfig) -> AsyncIterator[Delta]:
        """Deltas as the batch generates them; the last of each choice carries the rest of its final text."""
        loop = asyncio.get_running_loop()
        stop_ids = self.backend.checkpoint.eos_token_ids | set(sampling.stop_token_ids)
        # the worker thread decodes with its own tokenizer copy (a fast tokenizer is not shared across threads)
        texts = [TextDeltas(self._worker_tokenizer, sampling, stop_ids, i) for i in range(sampling.n)]
        job = _Job(encoded, sampling, loop.create_future(), loop, asyncio.Queue(), texts)
        self._jobs.put(job)
        while (delta := await job.deltas.get()) is not None:
            yield delta
        await job.future  # raises the batch's error, if any

    async def close(self) -> None:
        """Run every accepted request to the end, then stop the worker."""
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self.backend.close()

    # -- worker thread ----------------------------------------------------------------------------------

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch_size:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # finish this batch, then stop
                    stopping = True
                    break
                batch.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(_key(job), []).append(job)
            for jobs in groups.values():
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        streaming = any(j.texts is not None for j in jobs)
        try:
            results = self.backend.generate([j.encoded for j in jobs], jobs[0].sampling,
                                            _on_token(jobs) if streaming else None)
            if self.on_batch is not None:
                self.on_batch(len(jobs), time.perf_counter() - start)
        except RequestsFailed as e:  # some requests' own input failed them: the others get their answers
            for i, j in enumerate(jobs):
                _finish(j, e.results[i], InputError(e.failed[i]) if i in e.failed else None)
            return
        except InputError as e:  # the batch's shared settings are refused (a response_format schema)
            for j in jobs:
                _finish(j, None, e)
            return
        except Exception as e:  # noqa: BLE001 - handed to each waiting request, the worker keeps going
            log.exception("batch of %d failed", len(jobs))
            for j in jobs:
                _finish(j, None, e)
            return
        for j, completions in zip(jobs, results):
            _finish(j, completions, None)


def _on_token(jobs: list[_Job]):
    """The batch's ``on_token``: a streaming job's token to its choice's ``TextDeltas``, a delta out at once."""
    def on_token(prompt: int, choice: int, token: int, logprob, top) -> None:
        job = jobs[prompt]
        if job.texts is not None:
            delta = job.texts[choice].push(token, logprob, top)
            if delta is not None:
                job.send(delta)
    return on_token


def _finish(job: _Job, completions: list[Completion] | None, error: BaseException | None) -> None:
    """From the worker thread: a streaming job's last deltas and end, then its result or error."""
    if job.texts is not None:
        for text, completion in zip(job.texts, completions or []):
            job.send(text.finish(completion))
        job.send(None)
    job.loop.call_soon_threadsafe(_settle, job.future, completions, error)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

"""The batching engine: a bounded queue of requests and one worker thread that runs them on the model in
batches.

A request is one image and one or several tasks; each task is a row. The worker takes the oldest row and the
queued rows that can share its `generate` call, up to `max_batch_size`, waiting up to `max_wait_ms` for more
while nothing else is queued. Rows share a call when their prompts have the same length (so that no row is
padded: the same task, or tasks whose prompts are as long, such as <OD> and <OCR_WITH_REGION>) and their
generation settings are equal; each row is post-processed as its own task. The images of a
batch whose features are not computed yet go through the vision tower together, once per image whatever
the number of its tasks; each row then generates from its image's features (`generate(image_features=...)`).
A batch that fails is run again row by row, so one bad row fails only its own request. Sampled rows
(`do_sample`) run alone, so that a seed gives what the library gives for that request alone.

Everything the model does happens on the worker thread, with the GIL released by the native calls; callers
on an event loop wait on the request's `concurrent.futures.Future` (`asyncio.wrap_future`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..apps.labeling import scored_answer
from ..pipeline import ImageTextToTextPipeline
from .metrics import ServeMetrics
from .schemas import RequestError, TaskPrompt

#: The generation settings of Microsoft's Florence-2 examples; a request's own settings override them.
DEFAULT_GENERATION = {"max_new_tokens": 1024, "num_beams": 3, "do_sample": False}


@dataclass(frozen=True)
class EngineOptions:
    """The batching knobs.

    Attributes:
        max_batch_size: the most rows in one generate call.
        max_wait_ms: how long the oldest row may wait for others to share its call while nothing else is queued.
        max_queue: the most requests waiting (admitted, not started); one more is refused (HTTP 429).
        generation: the server's generation defaults (`DEFAULT_GENERATION` overridden by the command line).
    """

    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    generation: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_GENERATION))


class QueueFull(RequestError):
    """The queue holds `max_queue` waiting requests."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"the server's queue is full ({max_queue} requests waiting); retry later", status=429,
                         code="queue_full", error_type="rate_limit_error", headers={"Retry-After": "1"})


class EngineClosed(RequestError):
    """The engine stopped before the request could run."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica", status=503,
                         code="shutting_down", error_type="server_error", headers={"Retry-After": "1"})


@dataclass
class TaskAnswer:
    """One task's answer.

    Attributes:
        result: post_process_generation's answer (a string, or a dict with "scores" beside its boxes).
        text: the generated text as `pipeline()` gives it (special tokens dropped, without the prompt).
        generate_s: seconds of the generate call that produced it (shared by its batch).
        batch_size: rows in that call.
        prompt_tokens: the prompt's text tokens (the image's tokens not counted).
        tokens: the generated tokens (up to and with the end token).
        stopped: whether generation ended with the end token (rather than at max_new_tokens).
    """

    result: Any
    text: str
    generate_s: float
    batch_size: int
    prompt_tokens: int
    tokens: int
    stopped: bool


@dataclass
class Answer:
    """A request's answers: per task (in the request's order), and its timings in seconds."""

    tasks: Dict[str, TaskAnswer]
    queue_s: float
    image_s: float


class Job:
    """A request in the engine: its image's pixel values and size (all the model needs of the image, so that a
    queued request does not hold the decoded picture), its rows and its future (an `Answer`, or the exception
    that failed it). Created by `Engine.submit`."""

    def __init__(self, pixels: np.ndarray, image_size: Tuple[int, int], prompts: Sequence[TaskPrompt],
                 prompt_ids: Sequence[np.ndarray], settings: Dict[str, Any]) -> None:
        self.pixels: Optional[np.ndarray] = pixels
        self.image_size = image_size
        self.prompts = list(prompts)
        self.settings = settings
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.enqueued = time.perf_counter()
        self.started: Optional[float] = None
        self.features: Optional[np.ndarray] = None
        self.image_s = 0.0
        self.answers: Dict[str, TaskAnswer] = {}
        solo = bool(settings.get("do_sample"))
        key = tuple(sorted(settings.items()))
        self.rows = [_Row(self, prompt, ids, (len(ids), key, id(self) if solo else None))
                     for prompt, ids in zip(self.prompts, prompt_ids)]


@dataclass(eq=False)
class _Row:
    """One task of one request; rows with equal `key` can share a generate call."""

    job: Job
    prompt: TaskPrompt
    ids: np.ndarray
    key: Tuple


class Engine:
    """The model, its processor, the queue and the worker thread.

    Args:
        model: a loaded `Florence2ForConditionalGeneration`.
        processor: its processor.
        options: the batching knobs and generation defaults.
        metrics: where to count (a new `ServeMetrics` when None).
    """

    def __init__(self, model: Any, processor: Any, options: EngineOptions = EngineOptions(),
                 metrics: Optional[ServeMetrics] = None) -> None:
        self.model, self.processor, self.options = model, processor, options
        self.metrics = metrics or ServeMetrics()
        self._texts = ImageTextToTextPipeline(model, processor)
        # The encoder reads the image's tokens and the prompt's: the HF-native layout's prompt ids hold the
        # image's placeholders, Microsoft's layout puts the image tokens in front of them.
        self._max_positions = model.config.text_config.max_position_embeddings
        self._image_positions = 0 if processor.image_token_id is not None else processor.num_image_tokens
        self._eos = processor.tokenizer.eos_token_id
        self._image_token = -1 if processor.image_token_id is None else processor.image_token_id
        self._rows: Deque[_Row] = collections.deque()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="florence2-engine", daemon=True)
        self._worker.start()

    # -- callers ------------------------------------------------------------------------------------------
    def submit(self, image: Any, prompts: Sequence[TaskPrompt], settings: Dict[str, Any]) -> Job:
        """Queues a request, after computing its image's pixel values on the calling thread (callers on an
        event loop call it from a worker thread).

        Args:
            image: an RGB PIL image.
            prompts: its tasks.
            settings: generation settings set by the request (the server's defaults fill the rest).

        Returns:
            The job; its `future` gives an `Answer`, or raises the error that failed the request.

        Raises:
            QueueFull: `max_queue` requests are waiting.
            EngineClosed: the engine is shutting down.
            RequestError: a prompt longer than the model takes.
        """
        prompt_ids = []
        for prompt in prompts:
            ids = np.asarray(self.processor._core.encode_prompts([prompt.prompt], True)[0][0], np.int64)
            positions = len(ids) + self._image_positions
            if positions > self._max_positions:
                raise RequestError(f"the prompt of {prompt.task} is too long: {positions} tokens with the image's, "
                                   f"where the model reads at most {self._max_positions}; shorten the text",
                                   code="prompt_too_long")
            prompt_ids.append(ids)
        start = time.perf_counter()
        pixels = self.processor.image_processor([image], return_tensors="np")["pixel_values"][0]
        job = Job(pixels, image.size, prompts, prompt_ids, {**self.options.generation, **settings})
        job.image_s = time.perf_counter() - start
        with self._cond:
            if self._closed:
                raise EngineClosed()
            if self._waiting >= self.options.max_queue:
                raise QueueFull(self.options.max_queue)
            self._waiting += 1
            self.metrics.waiting.set(self._waiting)
            self._rows.extend(job.rows)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Takes a request that has not started out of the queue (its client left or its time ran out).

        Returns:
            True when it was still waiting (it will never run); False when it has started or finished.
        """
        with self._cond:
            if job.started is not None or job.future.done():
                return False
            self._rows = collections.deque(r for r in self._rows if r.job is not job)
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)
            job.future.cancel()
            return True

    def idle(self) -> bool:
        """Whether no request is waiting or running."""
        with self._cond:
            return self._waiting == 0 and self._running == 0

    def close(self, timeout: Optional[float] = None) -> None:
        """Stops the worker after its current batch; requests still queued fail with `EngineClosed`.

        Args:
            timeout: the longest to wait for the current batch (None: until it ends). The worker is a daemon
                thread, so a process that exits sooner does not wait for it.
        """
        with self._cond:
            self._closed = True
            left = {id(r.job): r.job for r in self._rows}
            self._rows.clear()
            self._waiting = 0
            self.metrics.waiting.set(0)
            self._cond.notify_all()
        for job in left.values():
            # A queued future can be cancelled by its caller at any moment; once running it cannot.
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosed())
        self._worker.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take_batch()
            try:
                self._run(batch)
            except BaseException as err:  # noqa: BLE001 - the worker must outlive any error, or every caller waits
                for job in {id(r.job): r.job for r in batch}.values():
                    if not job.future.done():
                        self._fail(job, err)

    def _take_batch(self) -> List[_Row]:
        """The oldest row and those that can join it (called with the lock held); marks their jobs started.

        A job starts by moving its future to running, after which its caller can no longer cancel it; a job
        whose future its caller cancelled while queued is dropped with all its rows, never counted running.
        """
        head = self._rows[0]
        limit = 1 if head.key[2] is not None else self.options.max_batch_size
        deadline = head.job.enqueued + self.options.max_wait_ms / 1000
        while True:
            batch = [r for r in self._rows if r.key == head.key][:limit]
            now = time.perf_counter()
            if len(batch) >= limit or len(batch) < len(self._rows) or now >= deadline or self._closed:
                break
            self._cond.wait(deadline - now)
        taken = set(map(id, batch))
        self._rows = collections.deque(r for r in self._rows if id(r) not in taken)
        now = time.perf_counter()
        cancelled = set()
        for row in batch:
            job = row.job
            if job.started is None:
                job.started = now
                self._waiting -= 1
                if not job.future.set_running_or_notify_cancel():
                    cancelled.add(id(job))
                    job.pixels = None
                    continue
                self._running += 1
                self.metrics.queue_seconds.observe(now - job.enqueued)
        if cancelled:
            batch = [r for r in batch if id(r.job) not in cancelled]
            self._rows = collections.deque(r for r in self._rows if id(r.job) not in cancelled)
        self.metrics.waiting.set(self._waiting)
        self.metrics.running.set(self._running)
        return batch

    def _run(self, batch: List[_Row]) -> None:
        """Runs a batch and hands out its answers; a failed batch is run again one row at a time."""
        batch = [r for r in batch if not r.job.future.done()]  # a row of a request that already failed
        if not batch:
            return
        try:
            answers = self._compute(batch)
        except Exception as err:  # noqa: BLE001 - any failure is retried per row, then belongs to that row
            if len(batch) == 1:
                self._fail(batch[0].job, err)
                return
            self.metrics.batch_retries.inc()
            for row in batch:
                self._run([row])
            return
        for row, answer in zip(batch, answers):
            self._deliver(row, answer)

    def _compute(self, batch: List[_Row]) -> List[TaskAnswer]:
        """The answers of a batch's rows (one generate call)."""
        jobs = list({id(r.job): r.job for r in batch if r.job.features is None}.values())
        if jobs:
            start = time.perf_counter()
            pixels = np.stack([j.pixels for j in jobs])
            features = np.asarray(self.model.get_image_features(pixels).pooler_output, np.float32)
            self.metrics.images.inc(len(jobs))
            for job, row_features in zip(jobs, features):
                job.features, job.pixels = row_features, None
                job.image_s += (time.perf_counter() - start) / len(jobs)
        start = time.perf_counter()
        ids = np.stack([r.ids for r in batch])
        out = self.model.generate(input_ids=ids, attention_mask=np.ones_like(ids),
                                  image_features=np.stack([r.job.features for r in batch]),
                                  return_dict_in_generate=True, **batch[0].job.settings)
        seconds = time.perf_counter() - start
        self.metrics.batch_size.observe(len(batch))
        sequences, token_scores = np.asarray(out.sequences), np.asarray(out.token_scores)
        answers = []
        for i, row in enumerate(batch):
            result = scored_answer(self.processor, row.prompt.task, sequences[i], token_scores[i],
                                   row.job.image_size)
            record = self._texts._records([row.prompt.prompt], row.ids[None], sequences[i:i + 1],
                                          return_full_text=False)[0]
            generated = sequences[i, 1:].tolist()
            stopped = self._eos in generated
            tokens = generated.index(self._eos) + 1 if stopped else len(generated)
            prompt_tokens = int(np.count_nonzero(row.ids != self._image_token))
            answers.append(TaskAnswer(result, record["generated_text"], seconds, len(batch), prompt_tokens, tokens,
                                      stopped))
        return answers

    def _deliver(self, row: _Row, answer: TaskAnswer) -> None:
        job = row.job
        job.answers[row.prompt.task] = answer
        if len(job.answers) < len(job.rows):
            return
        ordered = {p.task: job.answers[p.task] for p in job.prompts}
        self._finish(job)
        if not job.future.done():  # a running future changes state only here and in _fail (this thread)
            job.future.set_result(Answer(ordered, queue_s=job.started - job.enqueued, image_s=job.image_s))

    def _fail(self, job: Job, err: BaseException) -> None:
        with self._cond:
            self._rows = collections.deque(r for r in self._rows if r.job is not job)
        self._finish(job)
        if not job.future.done():
            job.future.set_exception(err)

    def _finish(self, job: Job) -> None:
        with self._cond:
            self._running -= 1
            self.metrics.running.set(self._running)
        job.pixels = job.features = None  # the request's memory goes with its answer, whoever still holds the job

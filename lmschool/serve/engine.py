"""The scheduler of `lmschool serve`: requests in, text out, each model's requests decoded as one
batch (continuous batching over `lmschool.generate.Decoder`).

    engine = Engine({"sft": served}, max_batch=32, max_queue=64)      # starts its thread
    job = Job("sft", [prompt_ids], [[RowSampling(64, seed=1)]], stop_texts=[], emit=callback)
    engine.submit(job)          # raises QueueFull when max_queue requests already wait
    ...                         # callback([(choice, text, finish_reason | None), ...]) per step
    engine.cancel(job)          # the client left: its rows stop at once, its slots are free

Design choices:
- **One thread runs every model.** Steps of different models alternate in it, so two models
  never fight over the CPU's cores, and the models' `Decoder`s need no locks. The HTTP side
  (asyncio) only submits and cancels jobs, under one lock.
- **Slots and a bounded queue.** At most `max_batch` rows (a request's `n` samples are rows) are
  decoded at once, over all models; a request that does not fit waits, in arrival order, in a
  queue of at most `max_queue` requests; one more is refused (`QueueFull`, the server's 429),
  never an unbounded backlog. A request is admitted between steps, so it joins a batch that is
  already running.
- **Text, not tokens, leaves the engine.** Each sample's tokens become text with `TextStream`
  (whole characters only); `stop` strings are found in the text, which is cut before them, and
  a suffix that could begin a stop string is held back until it is decided. One callback per
  job per step carries all of its samples' new text, so 32 streams cost 32 wake-ups of the
  event loop per step, not one per token and sample.
- **A failure stays in its batch.** An exception in a model's step fails that model's requests
  with the message (the server's 500) and starts its batch afresh; the server goes on.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from lmschool.generate import Decoder, RowSampling
from lmschool.tokenizer import TextStream

# (choice index, new text, finish reason or None); a failed job gets (None, message, "error")
Event = tuple


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: come back later."""


@dataclass
class Choice:
    """One sample of a job: its row in a decoder and the text it has written."""

    prompt: int                          # index of its prompt in the job
    settings: RowSampling
    stream: TextStream
    text: str = ""
    sent: int = 0                        # characters of `text` already handed to the client
    tokens: int = 0
    finish: str | None = None            # "stop" or "length" once done
    key: int | None = None               # its row in the model's Decoder


@dataclass
class Job:
    """One request: prompts (token ids) of one model, `samplings[p]` the rows of prompt p (its n
    samples), `stop_texts` the strings that end a sample, `emit` the callback for its events (called
    from the engine's thread)."""

    model: str
    prompts: list[list[int]]
    samplings: list[list[RowSampling]]
    stop_texts: list[str]
    emit: Callable[[list[Event]], None]
    choices: list[Choice] = field(default_factory=list)
    state: str = "new"                   # new, waiting, running, done, cancelled, failed
    submitted: float = 0.0

    @property
    def rows(self) -> int:
        return sum(len(s) for s in self.samplings)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


class Engine:
    """Decodes the jobs of several models (name -> object with `.model` and `.tokenizer`)."""

    def __init__(self, models: dict, max_batch: int = 32, max_queue: int = 64,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 pack_weights: bool = True, start: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.models, self.max_batch, self.max_queue, self.autocast = models, max_batch, max_queue, autocast
        self.decoders = {name: Decoder(m.model, m.tokenizer.fill_id, pack_weights) for name, m in models.items()}
        self.rows_of: dict[str, dict[int, tuple[Job, Choice]]] = {name: {} for name in models}
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.rows_active = 0                 # slots taken: undone rows of running jobs
        self.lock = threading.Condition()
        self.step_lock = threading.Lock()    # held around every step; `hold()` pauses the engine
        self.counts = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "refused": 0,
                       "tokens": 0, "steps": 0}
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lmschool-engine", daemon=True)
        if start:
            self.start()

    # ---- called from the server's side -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when `max_queue` jobs wait already, ValueError when the
        job has more rows than the engine has slots."""
        if job.rows > self.max_batch:
            raise ValueError(f"{job.rows} samples in one request, but the server decodes at most "
                             f"{self.max_batch} at once (--max-batch)")
        with self.lock:
            starts_now = not self.waiting and self.rows_active + job.rows <= self.max_batch
            if len(self.waiting) >= self.max_queue and not starts_now:
                self.counts["refused"] += 1
                raise QueueFull()
            job.choices = [Choice(p, s, TextStream(self.models[job.model].tokenizer))
                           for p, rows in enumerate(job.samplings) for s in rows]
            job.state, job.submitted = "waiting", time.monotonic()
            self.waiting.append(job)
            self.counts["requests"] += 1
            self.lock.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client left): out of the queue, or its rows' slots free at once and the
        rows dropped before the next step. A job already done is left as it is."""
        with self.lock:
            if job.state == "waiting":
                self.waiting.remove(job)
            elif job.state == "running":
                self.rows_active -= sum(1 for c in job.choices if c.finish is None)
            else:
                return
            job.state = "cancelled"
            self.counts["cancelled"] += 1
            self.lock.notify_all()

    def stats(self) -> dict:
        with self.lock:
            return {"rows_active": self.rows_active, "requests_running": len(self.running),
                    "requests_waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, **self.counts}

    @contextlib.contextmanager
    def hold(self):
        """No step runs while this is held (requests are still taken, cancelled, refused): for
        tests and benchmarks that need the engine still at a known point."""
        with self.step_lock:
            yield

    # ---- the engine's thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.running:
                    self.lock.wait()
                if self.stopping:
                    return
            with self.step_lock, self.autocast():
                try:
                    self._admit()
                    self._drop_cancelled()
                    for name, decoder in list(self.decoders.items()):
                        if len(decoder):
                            self._step(name, decoder)
                except Exception as e:   # a bug of the engine's own: fail what runs, keep serving
                    with self.lock:
                        jobs = list(self.running)
                    self._fail(jobs, e)
                    for name, decoder in self.decoders.items():
                        self.rows_of[name].clear()
                        self.decoders[name] = Decoder(decoder.model, decoder.pad_id, decoder.pack_weights)

    def _admit(self) -> None:
        """Move waiting jobs into their models' batches, in arrival order, while slots are free."""
        while True:
            with self.lock:
                if not self.waiting or self.rows_active + self.waiting[0].rows > self.max_batch:
                    return
                job = self.waiting.popleft()
                job.state = "running"
                self.running.append(job)
                self.rows_active += job.rows
            try:
                self._prefill(job)
            except Exception as e:   # a bad prompt for this model must not stop the others
                self._fail([job], e)

    def _prefill(self, job: Job) -> None:
        decoder, rows = self.decoders[job.model], self.rows_of[job.model]
        by_prompt: dict[int, list[Choice]] = {}
        for choice in job.choices:
            by_prompt.setdefault(choice.prompt, []).append(choice)
        events: list[Event] = []
        for p, choices in by_prompt.items():
            firsts = decoder.add(job.prompts[p], [c.settings for c in choices])
            for choice, (key, token, done) in zip(choices, firsts):
                choice.key = key
                rows[key] = (job, choice)
                events += self._deliver(job, choice, token, done)
        self._emit(job, events)

    def _drop_cancelled(self) -> None:
        with self.lock:
            gone = [job for job in self.running if job.state == "cancelled"]
            self.running = [job for job in self.running if job.state == "running"]
        for job in gone:
            for choice in job.choices:
                if choice.key is not None and choice.finish is None:
                    self.decoders[job.model].drop(choice.key)
                    self.rows_of[job.model].pop(choice.key, None)

    def _step(self, name: str, decoder: Decoder) -> None:
        rows = self.rows_of[name]
        try:
            out = decoder.step()
        except Exception as e:
            jobs = list({id(job): job for job, _ in rows.values()}.values())
            rows.clear()
            self.decoders[name] = Decoder(decoder.model, decoder.pad_id, decoder.pack_weights)
            self._fail(jobs, e)
            return
        self.counts["steps"] += 1
        events: dict[int, tuple[Job, list[Event]]] = {}
        for key, token, done in out:
            job, choice = rows.get(key, (None, None))
            if job is None or job.state != "running":
                continue
            new = self._deliver(job, choice, token, done)
            if new:
                events.setdefault(id(job), (job, []))[1].extend(new)
        for job, job_events in events.values():
            self._emit(job, job_events)

    def _deliver(self, job: Job, choice: Choice, token: int, done: bool) -> list[Event]:
        """A sample's new token: its new text (less a possible stop string's start), and its end."""
        choice.tokens += 1
        self.counts["tokens"] += 1
        choice.text += choice.stream.push(token)
        finish = None
        if done:
            choice.text += choice.stream.flush()
            finish = "stop" if token in choice.settings.stop_ids else "length"
        held = 0
        if job.stop_texts:
            cut = _find_stop(choice.text, job.stop_texts, choice.sent)
            if cut is not None:
                choice.text, finish = choice.text[:cut], "stop"
                if not done:
                    self.decoders[job.model].drop(choice.key)
            elif finish is None:
                held = _stop_prefix(choice.text, job.stop_texts)
        delta = choice.text[choice.sent:len(choice.text) - held]
        choice.sent += len(delta)
        if finish is None:
            return [(job.choices.index(choice), delta, None)] if delta else []
        choice.finish = finish
        self.rows_of[job.model].pop(choice.key, None)
        with self.lock:
            if job.state == "running":
                self.rows_active -= 1
                if all(c.finish is not None for c in job.choices):
                    job.state = "done"
                    self.running.remove(job)
                    self.counts["finished"] += 1
        return [(job.choices.index(choice), delta, finish)]

    def _emit(self, job: Job, events: list[Event]) -> None:
        if events:
            try:
                job.emit(events)
            except Exception:   # the client's side is gone (its loop closed): nothing to tell
                self.cancel(job)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        traceback.print_exception(error)
        message = f"the model failed while decoding: {type(error).__name__}: {error}"
        for job in jobs:
            for choice in job.choices:
                if choice.key is not None and choice.finish is None:
                    self.decoders[job.model].drop(choice.key)
                    self.rows_of[job.model].pop(choice.key, None)
            with self.lock:
                if job.state != "running":
                    continue
                self.rows_active -= sum(1 for c in job.choices if c.finish is None)
                job.state = "failed"
                self.running.remove(job)
                self.counts["failed"] += 1
            self._emit(job, [(None, message, "error")])


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string begins in `text` (None: nowhere). Text before `sent` was
    checked already, so the search starts just before it."""
    start = max(0, sent - max(len(s) for s in stops) + 1)
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (held back)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def seeded(seed: int | None) -> int:
    """A request's seed, or a fresh one: every row draws from its own generator."""
    return seed if seed is not None else secrets.randbits(62)

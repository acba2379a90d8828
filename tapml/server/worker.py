"""The one thread that runs the model, and the bounded queue of requests waiting for it.

Requests share the model's executor one at a time, in arrival order. A job reports through
`emit` (events the request's handler streams to its client) and looks at `cancelled` (its
client left) at every token; a cancelled job that has not started is dropped. A batching
worker can later take several waiting jobs at once from the same queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError

log = logging.getLogger("tapml")

Emit = Callable[[Any], None]
DONE = object()  # the last event of every job


class Cancelled(Exception):
    """Raised inside a job whose client has gone."""


@dataclass
class Job:
    work: Callable[[Emit, threading.Event], None]  # runs on the worker thread
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)


class Ticket:
    """A queued job's events, as an async iterator (in the event loop that submitted it);
    `cancel()` (the client went) stops the job at its next token, or before it starts."""

    def __init__(self, work: Callable[[Emit, threading.Event], None]):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()

        def emit(event: Any) -> None:
            # from the worker thread; a closed loop (the server stopping) hears nothing, and
            # the worker must live on
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._events.put_nowait, event)

        self.job = Job(work, emit)

    def __aiter__(self) -> Ticket:
        return self

    async def __anext__(self) -> Any:
        event = await self._events.get()
        if event is DONE:
            raise StopAsyncIteration
        return event

    def cancel(self) -> None:
        self.job.cancelled.set()  # a no-op once the job is done


class Worker:
    """Runs jobs one at a time on its own thread; at most `max_queue` wait for it."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self.counts = {"running": 0, "served": 0, "cancelled": 0, "refused": 0, "failed": 0}
        threading.Thread(target=self._loop, name="tapml-model", daemon=True).start()

    def health(self) -> dict[str, int]:
        with self._ready:
            return {"waiting": len(self._jobs), "max_queue": self.max_queue, **self.counts}

    def submit(self, work: Callable[[Emit, threading.Event], None]) -> Ticket:
        """Queue `work`; its events come through the Ticket. 429 when the queue is full."""
        ticket = Ticket(work)
        with self._ready:
            if len(self._jobs) + self.counts["running"] > self.max_queue:  # one runs, N wait
                self.counts["refused"] += 1
                raise ApiError(429, f"the server is busy: {len(self._jobs)} requests are "
                               "waiting already; try again shortly",
                               code="rate_limit_exceeded")  # fmt: skip
            self._jobs.append(ticket.job)
            self._ready.notify()
        return ticket

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job = self._jobs.popleft()
                skip = job.cancelled.is_set()
                self.counts["cancelled" if skip else "running"] += 1
            if not skip:
                self._run(job)
            job.emit(DONE)

    def _run(self, job: Job) -> None:
        outcome = "served"
        try:
            job.work(job.emit, job.cancelled)
        except Cancelled:
            outcome = "cancelled"
        except ApiError as e:
            outcome = "failed"
            job.emit(e)
        except Exception as e:  # the server goes on; the client hears what broke
            outcome = "failed"
            log.exception("a request failed")
            job.emit(ApiError(500, f"the model failed: {e}", code="model_error"))
        finally:
            with self._ready:
                self.counts["running"] -= 1
                self.counts[outcome] += 1

"""The engine thread of `openclaw serve`: the one thread that owns the LLM. Handler threads submit Jobs; it admits
them between steps, decodes every live request in one batch (llm.Streams) and sends each its deltas (plain data)
through the job's queue. A failure inside it fails one request (or, for a bug outside the engine's per-sequence
handling, one batch), never the thread.
"""

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from openclaw.errors import OpenClawError
from openclaw.llm import LLM, Request
from openclaw.server.openai_api import ApiError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request on its way through the engine thread. events: "accepted", Delta..., or an ApiError."""

    request: Request
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class EngineLoop(threading.Thread):
    """The one thread that touches the engine: admits queued jobs between steps, steps, and fans deltas out."""

    def __init__(self, llm: LLM, note: Callable[[str], None] = lambda line: None):
        """note: where the one-time news goes (the first eviction), the server's log."""
        super().__init__(name="openclaw-engine", daemon=True)
        self.llm, self.note = llm, note
        self.evicted = False
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.max_batch = 0  # the most sequences decoded in one step so far (at most --max-seqs)
        pool = llm.engine.pool
        # what GET /health shows: plain numbers, a new dict each step (handlers read it from their threads)
        self.load = {"running": 0, "waiting": 0, "kv_free": pool.num_slots, "kv_slots": pool.num_slots}

    def submit(self, request: Request) -> Job:
        job = Job(request)
        self.inbox.put(job)
        return job

    def stop(self) -> None:
        self.inbox.put(None)

    def run(self) -> None:
        streams = self.llm.streams()
        jobs: dict[int, Job] = {}
        while True:
            try:  # block only when idle; otherwise take whatever arrived since the last step
                job = self.inbox.get(timeout=0.5) if not jobs else self.inbox.get_nowait()
            except queue.Empty:
                job = False
            if job is None:
                streams.close()
                return
            if job:
                if not job.cancelled.is_set():  # its client left while it queued
                    self._admit(streams, jobs, job)
                continue  # admit everything queued before the next step, so arrivals share it
            for key in [k for k, j in jobs.items() if j.cancelled.is_set()]:
                streams.cancel(key)
                del jobs[key]
            if jobs:
                self._step(streams, jobs)
            self._measure()

    def _admit(self, streams, jobs: dict[int, Job], job: Job) -> None:
        try:
            jobs[streams.add(job.request)] = job
            job.events.put("accepted")
        except OpenClawError as e:  # can never fit (context, pool): the client's to fix
            job.events.put(ApiError(400, str(e), code="context_length_exceeded"))
        except Exception:  # a bug: this request fails, the thread (and every other request) goes on
            log.exception("admitting a request failed")
            job.events.put(ApiError(500, "the engine could not take this request; see the server log",
                                    kind="server_error"))

    def _step(self, streams, jobs: dict[int, Job]) -> None:
        try:
            deltas = streams.step()
        except Exception:  # the engine fails one sequence at a time; this is a bug outside that: fail the batch
            log.exception("engine step failed")
            for job in jobs.values():
                job.events.put(ApiError(500, "the engine failed on this batch; see the server log",
                                        kind="server_error"))
            streams.close()
            jobs.clear()
            return
        finished = 0
        for d in deltas:
            jobs[d.index].events.put(d)
            if not self.evicted and d.eviction:
                self.evicted = True
                self.note(d.eviction)
            if d.finish_reason:
                finished += 1
                del jobs[d.index]
        # the step's batch: what still runs, and what ran in it to its end
        self.max_batch = max(self.max_batch, len(self.llm.engine.scheduler.running) + finished)

    def _measure(self) -> None:
        scheduler, pool = self.llm.engine.scheduler, self.llm.engine.pool
        self.load = {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                     "kv_free": pool.allocator.num_free, "kv_slots": pool.num_slots}

"""Cost-bounded dynamic micro-batching: concurrent requests, for any adapters, with all their posterior samples,
run as batched-rows forwards in a worker thread while the event loop stays free.

A request is a :class:`Job`: ``n`` inputs of one adapter version under ``S`` draws of a predictive mode. Its
estimated cost is rows × tokens × passes (its inputs counted by the tokenizer, capped at the adapter's max
length). The engine's rooms:

* ``jobs.py``: the job, its pieces and its progress;
* ``scheduler.py``: admission (refused at once, 429, beyond the queue's bounds) and the steps (:class:`Engine`);
* ``worker.py``: a step in the worker thread: draws, batched forwards, the OOD base rows;
* ``answers.py``: the answers of finished jobs: predictive, OOD score, abstention.
"""

from service.engine.answers import JobResult
from service.engine.jobs import Job, Piece, Progress
from service.engine.scheduler import MAX_PASSED_OVER, BatchingConfig, Engine, Step

__all__ = [
    "MAX_PASSED_OVER",
    "BatchingConfig",
    "Engine",
    "Job",
    "JobResult",
    "Piece",
    "Progress",
    "Step",
]

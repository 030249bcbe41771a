"""Jobs over Redis Streams: any number of producers submit, one worker per GPU box runs.

Jobs outlive every process: they are kept in Redis (through coredis), not in anyone's
memory. A producer (``open_job_queue``) submits jobs and follows them; a worker
(``run_worker``, one ``ComfyAPI`` per box) takes them when it has a free instance, runs
them and puts their outputs into an ``OutputStore``.

The Redis layout, under a prefix ``<p>`` (default ``comfytrio``)::

    <p>:jobs:<pool>      stream, consumer group "workers": one entry per job ({job: id});
                         an entry is pending (leased) while a worker holds it, acked and
                         deleted once the job's outcome is written
    <p>:job:<id>         hash: status (queued|running|succeeded|canceling|canceled|failed|
                         expired), created_at/started_at/completed_at/expires_at, attempt,
                         worker, request (workflow, params, models, loras, seed,
                         same_images, max_shards, timeout as JSON), metadata, idempotency_key,
                         webhook_url, outputs, error, progress (JSON), last_error;
                         EXPIRE: the retention, from its latest change
    <p>:events:<id>      stream of the job's updates (kind: status|progress|log|output,
                         data: JSON), MAXLEN ~1000, same expiry; replayable from 0
    <p>:idem:<key>       string: the job id an idempotency key names (SET NX EX ttl)
    <p>:index            sorted set: created_at -> job id (listing, newest first)
    <p>:dead:<pool>      stream: entries delivered more than max_attempts times
    <p>:control          stream: cancel requests ({action: cancel, job, attempt}), followed
                         by every worker from its end
    <p>:worker:<name>    hash: pools, gpu_count, cuda_available, models, capacity, busy,
                         started_at, heartbeat_at; expires unless its heartbeat renews it

Every change that depends on what is there (is it terminal? is this attempt still the
job's? does this worker still own the entry?) is one Lua script: see ``_scripts.py``.
"""

from __future__ import annotations

from ._queue import JobQueue as JobQueue
from ._queue import open_job_queue as open_job_queue
from ._records import BrokerJob as BrokerJob
from ._records import BrokerOutput as BrokerOutput
from ._records import JobUpdate as JobUpdate
from ._records import WorkerInfo as WorkerInfo
from ._worker import run_worker as run_worker

__all__ = [
    "BrokerJob",
    "BrokerOutput",
    "JobQueue",
    "JobUpdate",
    "WorkerInfo",
    "open_job_queue",
    "run_worker",
]

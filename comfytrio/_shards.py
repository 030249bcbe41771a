"""The scheduler's contract: how a job is split, the task that carries one shard through the
queue, what the scheduler needs of an instance, and the runner it calls for each shard.

The scheduler knows nothing of workflows or files. A ``ShardTask[P, R]`` carries a payload
``P`` (for the api: the shard's plan and timeout) to a ``ShardRunner``, and ends with an
``outcome.Outcome[R]``: ``Value(R)`` when the runner returned, ``Error(ComfyAPIError)`` when
it raised, its job was cancelled or the api closed.
"""

from __future__ import annotations

import uuid
from typing import Generic, Protocol, TypeVar

import attrs
import trio
from outcome import Error, Outcome

__all__ = [
    "PROMPT_NAMESPACE",
    "ShardRunner",
    "ShardTask",
    "Worker",
    "distribute",
    "shard_prompt_id",
]

P = TypeVar("P")
"""What a shard carries to its runner."""
R = TypeVar("R")
"""What its runner returns."""
W_contra = TypeVar("W_contra", bound="Worker", contravariant=True)
"""The instances a runner runs shards on."""

PROMPT_NAMESPACE = uuid.UUID("5b0f3e52-8c1d-5d7e-9a43-2f6c1e0b7d19")
"""The ``uuid5`` namespace of the prompt ids of shards (``shard_prompt_id``)."""


def shard_prompt_id(job_id: str, index: int, attempt: int) -> str:
    """The prompt id of attempt ``attempt`` (1-based) of shard ``index`` of job ``job_id``:
    ``str(uuid.uuid5(PROMPT_NAMESPACE, f"{job_id}/{index}/{attempt}"))``.

    Deterministic, so whoever knows a job's id can find every prompt of it on the servers
    (after a restart that lost which prompts were posted, say); new for each attempt, and
    distinct across jobs with distinct ids. A job id used again (after its first job ended)
    gives the same prompt ids again: give each job its own id.

    >>> shard_prompt_id("job", 0, 1) == shard_prompt_id("job", 0, 1)
    True
    >>> shard_prompt_id("job", 0, 1) != shard_prompt_id("job", 0, 2)
    True
    """
    return str(uuid.uuid5(PROMPT_NAMESPACE, f"{job_id}/{index}/{attempt}"))


def distribute(total: int, gpu_count: int) -> list[int]:
    """Split ``total`` as evenly as possible over ``gpu_count`` slots, the larger shares first.

    >>> distribute(4, 3)
    [2, 1, 1]
    >>> distribute(6, 3)
    [2, 2, 2]
    >>> distribute(1, 3)
    [1, 0, 0]

    Raises ``ValueError`` when ``gpu_count`` < 1 or ``total`` < 0.
    """
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be at least 1, got {gpu_count}")
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    base, remainder = divmod(total, gpu_count)
    return [base + (1 if i < remainder else 0) for i in range(gpu_count)]


class Worker(Protocol):
    """What the scheduler needs of an instance: whether it may take work, and what its
    statistics show."""

    name: str
    """Its name, unique among the scheduler's instances."""
    restarts: int
    """How often its process was restarted."""
    hangs: int
    """How often it was found hung."""

    @property
    def state(self) -> str:
        """Its ``InstanceState``."""

    @property
    def healthy(self) -> bool:
        """Whether it may take work now."""

    async def wait_healthy(self) -> None:
        """Block until ``healthy`` (return at once if it is)."""

    @property
    def malformed(self) -> int:
        """Messages and answers of its server that ComfyUI never sends."""


@attrs.define(eq=False)
class ShardTask(Generic[P, R]):
    """One shard, from the queue to its end (it may be sent more than once: ``attempts``)."""

    job_id: str
    """Its job."""
    index: int
    """Its index in the job's split."""
    payload: P
    """What the runner needs."""
    prompt_id: str = attrs.field(
        default=attrs.Factory(lambda self: shard_prompt_id(self.job_id, self.index, 1), True)
    )
    """Chosen before it is sent, so it can be deleted even mid-submit:
    ``shard_prompt_id(job_id, index, attempts)``, new for each attempt."""
    enqueued_at: float = attrs.field(factory=trio.current_time)
    """When it entered the queue (``trio.current_time()``)."""
    started_at: float | None = None
    """When an instance took it (this attempt)."""
    finished_at: float | None = None
    """When it ended (this attempt)."""
    instance: str | None = None
    """The instance that took it (this attempt)."""
    outcome: Outcome[R] | None = None
    """How it ended: ``Value`` of what the runner returned, or ``Error`` of a
    ``ComfyAPIError``; None until it ended."""
    cancelled: bool = False
    """True once its job was cancelled."""
    attempts: int = 1
    """How many times it was sent (a lost server or vanished prompt sends it again)."""
    previous_instances: tuple[str, ...] = ()
    """Where earlier attempts were lost."""
    scope: trio.CancelScope | None = attrs.field(default=None, repr=False)
    """Cancels its runner; set while it runs."""

    @property
    def ended(self) -> bool:
        """True once it ended, however (done, failed or cancelled; not while it is retried)."""
        return self.outcome is not None

    @property
    def error(self) -> BaseException | None:
        """The error it ended with (a ``ComfyAPIError``); None while it runs or when it
        succeeded."""
        return self.outcome.error if isinstance(self.outcome, Error) else None

    def retry(self) -> None:
        """Make it ready to be sent again: the prompt id of its next attempt, and where it was
        lost noted."""
        self.attempts += 1
        self.previous_instances += (self.instance or "",)
        self.prompt_id = shard_prompt_id(self.job_id, self.index, self.attempts)
        self.instance = self.started_at = self.finished_at = None
        self.outcome = None


class ShardRunner(Protocol[W_contra, P, R]):
    """Runs one shard on one instance: returns what it produced, or raises
    ``ComfyAPIError`` (any other exception is a bug: it fails the shard, never the api).

    ``task.prompt_id`` is the prompt's id on the server; cancelling the runner (its job was
    cancelled, or the api closed) must remove the prompt from the server before it returns.
    """

    async def __call__(self, instance: W_contra, task: ShardTask[P, R], /) -> R:
        """Run ``task`` on ``instance``."""
        ...

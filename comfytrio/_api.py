"""``ComfyAPI``: supervise one ComfyUI per GPU and run workflows split across all of them."""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import httpx
import trio

from ._collect import OutputCollector
from ._download import DEFAULT_DOWNLOAD_TIMEOUT
from ._dry_run import CheckReport, check_job
from ._errors import NoInstanceReadyError, unwrapped
from ._fleet import start_all, watch_capacity
from ._gpu import detect_gpus
from ._http import default_ssl_context
from ._instance import Instance, InstanceState
from ._job_events import JobEvent, JobPlanned, send_event
from ._jobs import (
    OutputTask,
    ShardOutputs,
    ShardWork,
    job_result,
    reattach_prompt,
    run_shard,
    shard_ended,
)
from ._plan import JobPlan, job_seed_for, plan_validated, validate_params, workflow_snapshot
from ._plugins import Plugins, make_plugin_manager
from ._process import InstanceDirs, LaunchSpec
from ._scheduler import Scheduler
from ._shards import ShardTask
from ._statistics import ApiStatistics
from ._types import (
    ComfyUIInstance,
    FaultPolicy,
    GPUInfo,
    JobResult,
    LoRARef,
    ModelRef,
    RemoteComfyUI,
)

__all__ = ["ComfyAPI", "WorkflowOptions"]

logger = logging.getLogger("comfytrio")

DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024**3
"""The default size cap of one output file downloaded from a remote server (4 GiB)."""


_SAFE_ID = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,128}")
"""A job id or prompt id we accept from a caller: it names folders and goes into URLs."""


def _check_max_shards(max_shards: int | None) -> None:
    """``ValueError`` unless ``max_shards`` is None or an integer of at least 1."""
    if max_shards is None:
        return
    if isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1:
        raise ValueError(f"max_shards must be None or an integer of at least 1, got {max_shards!r}")


def _shard_count(ready: int, max_shards: int | None) -> int:
    """How many shards a job gets on ``ready`` instances."""
    return ready if max_shards is None else min(ready, max_shards)


class WorkflowOptions(TypedDict, total=False):
    """The keywords of ``ComfyAPI.execute_workflow`` and ``check_workflow``
    (``run_workflow`` takes ``timeout``, ``job_id`` and ``events`` too); each is optional."""

    models: Sequence[ModelRef]
    """Model files that must exist before the workflow runs (checked when it is planned)."""
    loras: Sequence[LoRARef]
    """LoRAs the workflow uses, downloaded when absent."""
    params: Mapping[str, Mapping[str, Any]] | None
    """The job's params, by name (checked when the job is called)."""
    seed: int | None
    """The job seed (give a result's ``seed`` again to reproduce it; None: a random one)."""
    same_images: bool
    """Refuse (``NotReproducibleError``) a split that would not make the images of one GPU
    (see ``run_workflow``)."""
    max_shards: int | None
    """Split the job into at most this many shards (None: one per ready instance). The
    shard count is ``min(ready instances, max_shards)``; ``max_shards=1`` runs the whole
    job, its whole batch, as one prompt on whichever server frees first. Below 1:
    ``ValueError``."""


class ComfyAPI:
    """Run workflows on several ComfyUI servers at once; use as ``async with``.

    ``instances`` are local installs (``ComfyUIInstance``; started by us unless
    ``auto_start=False``, which attaches to servers already running on those ports) and
    remote servers (``RemoteComfyUI`` or a URL string). With CUDA, the i-th local instance
    runs pinned to GPU i (``CUDA_VISIBLE_DEVICES=i``); without it, local instances run with
    ``--cpu``. Leaving the block stops every process we started (SIGTERM, then SIGKILL after
    ``grace`` seconds), whatever exception is in flight.

    Arguments: ``models_path`` (models root, ``checkpoints/``, ``loras/``, ...; default:
    the ``models/`` folder of the first local install, and none when every server is
    remote, whose models are checked through its ``/models`` route); ``gpu``
    (``GPUInfo``; None detects with NVML); ``ready_timeout`` (seconds for a server to answer
    ``/system_stats``); ``execution_timeout`` (seconds a shard may run, counted from when
    its prompt starts to run on its server, default an hour: time in the server's queue is
    not counted);
    ``state_dir`` (per-instance folders, default ``<install>/comfytrio``); ``download_dir``
    (outputs of remote servers, default ``./comfytrio-outputs``); ``plugins`` (a
    ``make_plugin_manager()`` result; default: every installed plugin); ``env`` (extra
    environment for our processes); ``prompts_per_instance`` (our prompts kept inside each
    ComfyUI, default 2); ``faults`` (``FaultPolicy``: retries, restarts, health probes);
    ``min_instances`` (the block is entered once this many instances are ready, default 1;
    the others join as they become ready: a remote server that cannot be reached yet is
    retried in the background, and a process of ours that cannot start is logged);
    ``max_output_bytes`` (the size cap of one output downloaded from a remote server; a
    shard's downloads must also end within its ``execution_timeout`` after its prompt);
    ``download_timeout`` (seconds one LoRA or image URL download may take in all, for the
    plugin manager the api makes; default an hour); ``slow_planning`` (seconds after which a
    job still being planned, waiting on a download say, lets the next job be planned too;
    None: jobs are planned strictly one after another).

    Raises on entry, after stopping what was started: ``ComfyUIStartupError``
    (``PortInUseError``) when so many of our processes cannot start that fewer than
    ``min_instances`` are left, ``ComfyUITimeoutError`` when fewer than ``min_instances``
    are ready after ``ready_timeout`` seconds; ``ValueError`` when no instance is given.
    """

    def __init__(
        self,
        instances: Sequence[ComfyUIInstance | RemoteComfyUI | str],
        models_path: str | Path | None = None,
        *,
        gpu: GPUInfo | None = None,
        auto_start: bool = True,
        ready_timeout: float = 120.0,
        execution_timeout: float = 3600.0,
        state_dir: str | Path | None = None,
        download_dir: str | Path | None = None,
        plugins: Plugins | None = None,
        grace: float = 10.0,
        env: Mapping[str, str] | None = None,
        prompts_per_instance: int = 2,
        faults: FaultPolicy | None = None,
        min_instances: int = 1,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
        slow_planning: float | None = 2.0,
    ) -> None:
        self.max_output_bytes = max_output_bytes
        self.download_timeout = download_timeout
        if min_instances < 1:
            raise ValueError(f"min_instances must be at least 1, got {min_instances}")
        self.min_instances = min_instances
        local = [i for i in instances if isinstance(i, ComfyUIInstance)]
        if models_path is None and local:  # ComfyUI's own models folder
            models_path = Path(local[0].path) / "models"
        self.models_path: Path | None = (
            Path(models_path).resolve() if models_path is not None else None
        )
        self.gpu = gpu if gpu is not None else detect_gpus()
        self.auto_start = auto_start
        self.ready_timeout = ready_timeout
        self.execution_timeout = execution_timeout
        self.download_dir = Path(download_dir or Path.cwd() / "comfytrio-outputs").resolve()
        self._state_dir = Path(state_dir).resolve() if state_dir is not None else None
        self._plugins = plugins
        self._grace = grace
        self._env = dict(env or {})
        self.faults = faults or FaultPolicy()
        self.instances: list[Instance] = self._build_instances(instances)
        self._scheduler: Scheduler[Instance, ShardWork, ShardOutputs] = Scheduler(
            self._run_shard,
            depth=prompts_per_instance,
            max_attempts=self.faults.max_shard_attempts,
            slow_planning=slow_planning,
            on_end=shard_ended,
        )
        self._running_jobs: set[str] = set()
        self._cm: AbstractAsyncContextManager[ComfyAPI] | None = None
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ set-up

    def _build_instances(
        self, given: Sequence[ComfyUIInstance | RemoteComfyUI | str]
    ) -> list[Instance]:
        local = [i for i in given if isinstance(i, ComfyUIInstance)]
        remote = [
            RemoteComfyUI(i) if isinstance(i, str) else i
            for i in given
            if not isinstance(i, ComfyUIInstance)
        ]
        if self.gpu.cuda_available:
            active = local[: self.gpu.device_count]
            if len(local) < self.gpu.device_count:
                unused = list(range(len(local), self.gpu.device_count))
                logger.warning(
                    "%d GPU(s) found but only %d local instance(s) given: GPU(s) %s stay unused",
                    self.gpu.device_count,
                    len(local),
                    unused,
                )
            if len(local) > self.gpu.device_count:
                logger.warning(
                    "%d local instance(s) given but only %d GPU(s): ports %s are not used",
                    len(local),
                    self.gpu.device_count,
                    [i.port for i in local[self.gpu.device_count :]],
                )
        else:
            count = self.gpu.device_count or len(local)
            active = local[:count]
            if local:
                logger.info("no CUDA: %d local instance(s) run with --cpu", len(active))
        built: list[Instance] = []
        for index, spec in enumerate(active):
            name = f"127.0.0.1:{spec.port}"
            if self.auto_start:
                root = (self._state_dir or Path(spec.path).resolve() / "comfytrio") / str(spec.port)
                launch = LaunchSpec(
                    name=name,
                    comfyui_path=Path(spec.path).resolve(),
                    port=spec.port,
                    dirs=InstanceDirs(root),
                    python=spec.python or sys.executable,
                    cpu=not self.gpu.cuda_available,
                    cuda_device=index if self.gpu.cuda_available else None,
                    models_path=self.models_path,
                    extra_args=spec.extra_args,
                    ready_timeout=self.ready_timeout,
                    grace=self._grace,
                    env=self._env,
                )
                built.append(
                    Instance(index, name, spec.base_url, launch=launch, **self._instance_options())
                )
            else:
                built.append(
                    Instance(
                        index,
                        name,
                        spec.base_url,
                        comfyui_path=Path(spec.path).resolve(),
                        **self._instance_options(),
                    )
                )
        for server in remote:
            url = server.url.rstrip("/")
            name = server.name or re.sub(r"^https?://", "", url)
            built.append(
                Instance(
                    len(built),
                    name,
                    url,
                    ssl_context=server.ssl_context,
                    **self._instance_options(),
                )
            )
        if not built:
            raise ValueError("ComfyAPI needs at least one instance to run on")
        return built

    def _instance_options(self) -> dict[str, Any]:
        f = self.faults
        return {
            "ready_timeout": self.ready_timeout,
            "max_restarts": f.max_restarts,
            "restart_backoff": f.restart_backoff,
            "health_interval": f.health_interval,
            "hang_timeout": f.hang_timeout,
            "client_options": {
                "reconnect_timeout": f.reconnect_timeout,
                "silence_timeout": f.silence_timeout,
            },
        }

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[ComfyAPI]:
        if self._plugins is None:
            self._plugins = make_plugin_manager(download_timeout=self.download_timeout)
        # Our nursery wraps what the caller's block raised: give it back as it was.
        with unwrapped():
            async with (
                httpx.AsyncClient(
                    verify=default_ssl_context(),
                    timeout=httpx.Timeout(300.0, connect=10.0),
                    follow_redirects=True,
                ) as http,
                trio.open_nursery() as nursery,
            ):
                self._http = http
                await start_all(
                    self.instances,
                    nursery,
                    need=self.min_instances,
                    ready_timeout=self.ready_timeout,
                )
                for instance in self.instances:
                    nursery.start_soon(self._scheduler.run_worker, instance)
                nursery.start_soon(self._watch_capacity)
                try:
                    yield self
                finally:
                    self._http = None
                    self._scheduler.close()
                    # Running shards remove their prompts from their servers first (each
                    # within the client's cancel_timeout), while the clients are still open.
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + 15):
                        await self._scheduler.wait_drained()
                    nursery.cancel_scope.cancel()

    async def _watch_capacity(self) -> None:
        """Fail the queued shards while no instance can take them (``watch_capacity``)."""
        await watch_capacity(self.instances, self._scheduler, self.faults.no_instance_timeout)

    async def __aenter__(self) -> ComfyAPI:
        """Start (or attach to) every instance in parallel; ready when ``min_instances``
        answer."""
        self._cm = self._open()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop every process we started (SIGTERM, grace, SIGKILL) and close connections."""
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ jobs

    async def execute_workflow(
        self, workflow: Mapping[str, Any], **options: Unpack[WorkflowOptions]
    ) -> list[str]:
        """Run ``workflow`` split across the instances; return the absolute paths of every
        output file (the seed library's call). Its keywords (``models``, ``loras``,
        ``params``, ``seed``, ``same_images``, ``max_shards``) are ``run_workflow``'s.

        Some shards failing: their errors are logged, the others' files are returned. Every
        shard failing: the first error is raised, with the others in ``other_errors``.
        Raises ``ParamError``, ``ModelNotFoundError``, ``DownloadError`` before anything runs.
        """
        result = await self.run_workflow(workflow, **options)
        return result.paths

    async def run_workflow(
        self,
        workflow: Mapping[str, Any],
        *,
        models: Sequence[ModelRef] = (),
        loras: Sequence[LoRARef] = (),
        params: Mapping[str, Mapping[str, Any]] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        same_images: bool = False,
        max_shards: int | None = None,
        job_id: str | None = None,
        events: trio.MemorySendChannel[JobEvent] | None = None,
    ) -> JobResult:
        """Like ``execute_workflow`` but return a ``JobResult``: every output (path, instance,
        node id, file name, sub-folder, type), every failed shard, seeds and timings.

        ``timeout`` bounds each shard's run (default: the api's ``execution_timeout``),
        counted from when its prompt starts to run on its server, and then its downloads; a
        shard past it fails with ``ComfyUITimeoutError`` and its prompt is interrupted. If
        the caller is cancelled, the job's prompts are deleted or interrupted on every server
        before the cancellation goes on.

        A split batch never repeats an image. A ``gpu_scale`` param that sets the
        ``batch_size`` of an ``EmptyLatentImage`` (of at most 64) keeps the whole batch
        and the seed on every shard and cuts each shard's part with ``LatentFromBatch``:
        each image is the one-GPU image of its ``OutputFile.batch_index`` (``JobResult.split``
        says whether that held). Other splits give each shard's samplers their own seeds.
        ``same_images=True`` raises ``NotReproducibleError`` (before anything runs) for a
        split that would not make the one-GPU images: an ancestral, SDE or LCM sampler, a
        batch over 64, a split of anything but an ``EmptyLatentImage`` batch.

        ``max_shards``: split the job into at most that many shards (``min(ready
        instances, max_shards)``; 1: the whole job as one prompt on whichever server frees
        first). ``job_id``: the caller's id for the job (letters, digits, ``_``, ``-``,
        ``.``; at most 128), in logs, ``statistics()``, ``JobResult.job_id`` and the
        prompt ids: attempt ``a`` of shard ``i`` is prompt ``shard_prompt_id(job_id, i,
        a)`` on its server, so a caller that lost track can find them again
        (``reattach``). Default: a new random id; give each job its own (an id used again
        gives the same prompt ids, which ComfyUI may answer from its cache).
        ``events``: the job's ``JobPlanned``, ``ShardSubmitted``, ``ShardFinished`` and
        ``ShardFailed`` (exported by ``comfytrio``), sent with ``send_nowait``: a full or
        closed channel drops them with a warning; the job never waits on it and never
        closes it.

        Raises ``ValueError`` for a ``max_shards`` below 1, a malformed ``job_id`` or one
        of a job running in this api (before anything runs); else as ``execute_workflow``.
        """
        if self._http is None or self._plugins is None:
            raise RuntimeError("use ComfyAPI inside `async with`")
        started_at = trio.current_time()
        _check_max_shards(max_shards)
        if job_id is None:
            job_id = uuid.uuid4().hex[:12]
        elif not isinstance(job_id, str) or not _SAFE_ID.fullmatch(job_id):
            raise ValueError(
                f"job_id must be 1 to 128 letters, digits, '_', '-' or '.' (not only dots), "
                f"got {job_id!r}"
            )
        if job_id in self._running_jobs:
            raise ValueError(f"job_id {job_id!r} is already running in this api")
        self._running_jobs.add(job_id)
        try:
            return await self._run_job(
                job_id,
                started_at,
                workflow,
                models=models,
                loras=loras,
                params=params,
                seed=seed,
                timeout=timeout,
                same_images=same_images,
                max_shards=max_shards,
                events=events,
            )
        finally:
            self._running_jobs.discard(job_id)

    async def _run_job(
        self,
        job_id: str,
        started_at: float,
        workflow: Mapping[str, Any],
        *,
        models: Sequence[ModelRef],
        loras: Sequence[LoRARef],
        params: Mapping[str, Mapping[str, Any]] | None,
        seed: int | None,
        timeout: float | None,
        same_images: bool,
        max_shards: int | None,
        events: trio.MemorySendChannel[JobEvent] | None,
    ) -> JobResult:
        """``run_workflow`` once its job id is taken."""
        assert self._http is not None
        assert self._plugins is not None
        self._ready_instances()  # fail at once rather than after waiting our turn
        # Checked and copied now: a bad param fails at once, and the job runs the workflow as
        # it is now, though it is planned only when its turn comes.
        checked = validate_params(self._plugins, workflow, params or {})
        workflow_json = workflow_snapshot(workflow)
        job_seed = job_seed_for(seed)
        async with self._scheduler.admit(job_id):
            ready = self._ready_instances()
            plan: JobPlan = await plan_validated(
                self._plugins,
                workflow_json,
                checked,
                models=models,
                loras=loras,
                targets=ready,
                shard_count=_shard_count(len(ready), max_shards),
                models_path=(
                    self.models_path if any(i.owned or i.is_local for i in ready) else None
                ),
                http=self._http,
                job_seed=job_seed,
                same_images=same_images,
            )
            logger.info(
                "job %s: %d shard(s) for %d instance(s)", job_id, len(plan.shards), len(ready)
            )
            limit = self.execution_timeout if timeout is None else timeout
            shards: list[OutputTask] = [
                ShardTask(job_id, s.index, ShardWork(s, limit, events)) for s in plan.shards
            ]
            send_event(events, JobPlanned(job_id, len(shards), plan.split, plan.seed))
            self._scheduler.submit(job_id, shards)
        finished = await self._scheduler.wait(job_id)
        return job_result(job_id, finished, seed=plan.seed, started_at=started_at, split=plan.split)

    async def check_workflow(
        self, workflow: Mapping[str, Any], **options: Unpack[WorkflowOptions]
    ) -> CheckReport:
        """A dry run of ``run_workflow`` (its keywords but ``timeout``, ``job_id`` and
        ``events``): plan the job on the
        instances ready now and check each shard's workflow against every one's
        ``/object_info`` (node classes, required inputs, links, types, ranges, lists such as
        model files) and ``models`` against their ``/models`` lists (``max_shards`` bounds
        the shards planned, as for ``run_workflow``). Returns a
        ``CheckReport``: the shards with their params and seeds, and every problem (a bad
        param, an unknown title, a wrong model name...), not just the first. Sends no
        prompt, uploads and downloads nothing (an image param is not prepared: see
        ``CheckReport.notes``). Raises only ``ValueError`` (a bad ``seed`` or
        ``max_shards``) and, with no instance ready, ``ComfyAPIError``."""
        if self._http is None or self._plugins is None:
            raise RuntimeError("use ComfyAPI inside `async with`")
        max_shards = options.get("max_shards")
        _check_max_shards(max_shards)
        ready = self._ready_instances()
        local = any(i.owned or i.is_local for i in ready)
        return await check_job(
            self._plugins,
            workflow,
            params=options.get("params") or {},
            models=options.get("models", ()),
            loras=options.get("loras", ()),
            seed=options.get("seed"),
            same_images=options.get("same_images", False),
            instances=ready,
            models_path=self.models_path if local else None,
            http=self._http,
            shard_count=_shard_count(len(ready), max_shards),
        )

    def _ready_instances(self) -> list[Instance]:
        """The instances ready now; ``NoInstanceReadyError`` when there are none."""
        ready = [i for i in self.instances if i.state == InstanceState.READY]
        if not ready:
            raise NoInstanceReadyError({i.name: str(i.state) for i in self.instances})
        return ready

    async def _run_shard(self, instance: Instance, task: OutputTask) -> ShardOutputs:
        """The scheduler's runner: ``run_shard`` with the api's output settings."""
        collector = OutputCollector(self.download_dir, self.max_output_bytes)
        return await run_shard(instance, task, collector)

    async def reattach(
        self, prompt_id: str, *, url: str | None = None, timeout: float | None = None
    ) -> ShardOutputs:
        """Find a prompt posted earlier (by this api, or by a process that was restarted
        since: ``ShardSubmitted.prompt_id``, ``shard_prompt_id``) on the ready instances,
        wait while it is queued or running there, and return its outputs, collected as a
        shard's are (read in place from a local server, else downloaded into
        ``download_dir/<prompt id>/<instance>/``).

        ``url``: the base URL of the server it was posted to (``ShardSubmitted.url``),
        asked first; then every other ready instance. Its events go to the websocket of
        the client that posted it, so it is watched by polling (``/api/jobs/{id}`` where
        the server has it, else ``/queue`` and ``/history/{id}``; every 0.25 s at first,
        every 2 s at most). ``timeout`` (default: the api's ``execution_timeout``) counts
        from when it is first seen running, as a shard's: past it, the prompt is
        interrupted; it bounds the downloads too. If the caller is cancelled while it
        waits, the prompt is removed from its server (deleted if queued, interrupted if
        running) before the cancellation goes on.

        Only what ``/history`` lists can be had: images a ``SaveImageWebsocket`` node sent
        over the websocket went to the client that posted the prompt and are lost. The
        files have no ``batch_index`` (the split is not known here); the values have
        shard 0.

        Raises ``PromptVanishedError`` when no ready server knows the prompt (or it leaves
        its server's queue without running), ``ServerLostError`` when a server that could
        have it (the one of ``url``, not ready say) cannot say and no other has it, or
        cannot say for its ``reconnect_timeout`` while it waits; ``ExecutionError`` when it
        failed (with the node's details and the files it wrote before, as ``run_workflow``
        reports them), ``ExecutionInterruptedError`` when it was interrupted,
        ``ComfyUITimeoutError`` past ``timeout``, ``ComfyAPIError`` when no instance is
        ready, ``ValueError`` for a malformed ``prompt_id`` (1 to 128 letters, digits,
        ``_``, ``-`` or ``.``).
        """
        if self._http is None:
            raise RuntimeError("use ComfyAPI inside `async with`")
        if not isinstance(prompt_id, str) or not _SAFE_ID.fullmatch(prompt_id):
            raise ValueError(
                "prompt_id must be 1 to 128 letters, digits, '_', '-' or '.' (not only dots), "
                f"got {prompt_id!r}"
            )
        candidates = self._ready_instances()
        if url is not None:
            base = url.rstrip("/")
            # That server first, ready or not: one that cannot say where the prompt is makes
            # a ServerLostError, not a PromptVanishedError, if no other server has it.
            named = [i for i in self.instances if i.url.rstrip("/") == base]
            candidates = named + [i for i in candidates if i not in named]
        collector = OutputCollector(self.download_dir, self.max_output_bytes)
        limit = self.execution_timeout if timeout is None else timeout
        return await reattach_prompt(candidates, prompt_id, collector, timeout=limit)

    def statistics(self) -> ApiStatistics:
        """A frozen snapshot: per instance its state, prompts in flight, busy time, shards
        done and failed; per job its shards and when it was queued, started and finished;
        the number of shards waiting in the queue."""
        return self._scheduler.statistics(self.instances)

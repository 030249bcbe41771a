"""``ComfyAPI``: supervise one ComfyUI per GPU and run workflows split across all of them."""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import trio

from ._client import PromptResult, tls_context
from ._download import DEFAULT_DOWNLOAD_TIMEOUT
from ._errors import (
    ComfyAPIError,
    ComfyUITimeoutError,
    ExecutionError,
    ServerLostError,
    ServerProtocolError,
    UnsafeNameError,
    unwrapped,
)
from ._files import output_path
from ._gpu import detect_gpus
from ._instance import Instance, InstanceState
from ._plan import JobPlan, job_seed_for, plan_validated, validate_params, workflow_snapshot
from ._plugins import Plugins, make_plugin_manager
from ._process import InstanceDirs, LaunchSpec
from ._scheduler import ApiStatistics, Scheduler, ShardTask
from ._types import (
    ComfyUIInstance,
    FaultPolicy,
    GPUInfo,
    JobResult,
    LoRARef,
    ModelRef,
    OutputFile,
    RemoteComfyUI,
    ShardFailure,
    ShardReport,
)
from .hookspecs import run_concurrently

__all__ = ["ComfyAPI"]

logger = logging.getLogger("comfytrio")

DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024**3
"""The default size cap of one output file downloaded from a remote server (4 GiB)."""

_DOWNLOADS_PER_SHARD = 8
"""How many of one shard's outputs are downloaded at the same time."""

JOB_MARKER_INPUT = "comfytrio_prompt"
"""An extra input we add to every output node, set to the prompt id: ComfyUI ignores unknown
inputs but counts them in its cache key, so an output node never replays the files of another
job, another shard of the same job, or an earlier attempt of the same shard."""


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Run every wait at once; return when the first returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


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
        self._scheduler = Scheduler(
            self._run_shard,
            depth=prompts_per_instance,
            max_attempts=self.faults.max_shard_attempts,
            slow_planning=slow_planning,
        )
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
                    verify=tls_context(),
                    timeout=httpx.Timeout(300.0, connect=10.0),
                    follow_redirects=True,
                ) as http,
                trio.open_nursery() as nursery,
            ):
                self._http = http
                await self._start_all(nursery)
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
        """Fail the queued shards when no instance could take them for
        ``no_instance_timeout`` seconds, so no job waits forever on servers that are all
        gone; then fail each shard queued until one can again. Woken by the instances'
        state changes and the queue, never by a timer of its own."""
        limit = self.faults.no_instance_timeout
        while True:
            await self._wait_none_healthy()
            with trio.move_on_after(limit):
                await self._wait_some_healthy()
                continue
            while not any(i.healthy for i in self.instances):
                count = self._scheduler.fail_queued(
                    ServerLostError(
                        "all",
                        f"no ComfyUI instance has been able to take work for {limit:g} s "
                        f"(states: {', '.join(f'{i.name}={i.state}' for i in self.instances)})",
                    )
                )
                if count:
                    logger.error("failed %d queued shard(s): no healthy instance", count)
                await _first_of(self._wait_some_healthy, self._scheduler.wait_queued)

    async def _wait_none_healthy(self) -> None:
        """Until no instance is healthy. Waiting on each healthy one in turn is enough: the
        one waited on is healthy, so the last to go is always one waited on."""
        while healthy := [i for i in self.instances if i.healthy]:
            while healthy[0].healthy:
                await healthy[0].wait_state_change()

    async def _wait_some_healthy(self) -> None:
        """Until some instance is healthy (at once if one is)."""
        await _first_of(*(i.wait_healthy for i in self.instances))

    async def _start_all(self, nursery: trio.Nursery) -> None:
        """Start (or connect to) every instance at once; return once each has had its first
        try (our processes started or failed, the other servers answered or not) and at
        least ``min_instances`` are ready. Servers that did not answer go on connecting in
        ``nursery`` and take work when they are ready. Raises the first startup error (the
        others in ``other_errors``) as soon as too few instances are left to reach
        ``min_instances``, and ``ComfyUITimeoutError`` when they are not ready in
        ``ready_timeout`` seconds."""
        need = min(self.min_instances, len(self.instances))
        ready: list[Instance] = []
        failed: list[ComfyAPIError] = []
        settled = trio.Event()

        async def start(instance: Instance) -> None:
            try:
                with unwrapped(ComfyAPIError):
                    await nursery.start(instance.serve)
            except ComfyAPIError as exc:  # our process could not start
                instance.last_error, instance.state = exc, InstanceState.FAILED
                failed.append(exc)
                logger.error("ComfyUI %s could not be started: %s", instance.name, exc)
            else:
                ready.append(instance)
            if len(ready) >= need or len(self.instances) - len(failed) < need:
                settled.set()

        for instance in self.instances:
            nursery.start_soon(start, instance)
        # Our processes time out by themselves after ready_timeout; a little more for them.
        with trio.move_on_after(self.ready_timeout + 5.0):
            for instance in self.instances:  # so a job's split counts every server up now
                await instance.tried.wait()
            await settled.wait()
        if len(ready) >= need:
            waiting = [
                i.name for i in self.instances if i not in ready and i.state != InstanceState.FAILED
            ]
            logger.info(
                "%d ComfyUI instance(s) ready%s",
                len(ready),
                f"; still starting or connecting: {', '.join(waiting)}" if waiting else "",
            )
            return
        if failed and len(self.instances) - len(failed) < need:
            failed[0].other_errors = list(failed[1:])
            raise failed[0]
        late = [i for i in self.instances if i not in ready]
        raise ComfyUITimeoutError(
            f"{len(ready)} of the {need} ComfyUI instance(s) needed were ready after "
            f"{self.ready_timeout:g} s; "
            + "; ".join(f"{i.name}: {i.last_error or i.state}" for i in late),
            instance=late[0].name,
            timeout=self.ready_timeout,
        )

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
        self,
        workflow: Mapping[str, Any],
        *,
        models: Sequence[ModelRef] = (),
        loras: Sequence[LoRARef] = (),
        params: Mapping[str, Mapping[str, Any]] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Run ``workflow`` split across the instances; return the absolute paths of every
        output file (the seed library's call).

        Some shards failing: their errors are logged, the others' files are returned. Every
        shard failing: the first error is raised, with the others in ``other_errors``.
        Raises ``ParamError``, ``ModelNotFoundError``, ``DownloadError`` before anything runs.
        """
        result = await self.run_workflow(
            workflow, models=models, loras=loras, params=params, seed=seed
        )
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
    ) -> JobResult:
        """Like ``execute_workflow`` but return a ``JobResult``: every output (path, instance,
        node id, file name, sub-folder, type), every failed shard, seeds and timings.

        ``timeout`` bounds each shard's run (default: the api's ``execution_timeout``),
        counted from when its prompt starts to run on its server, and then its downloads; a
        shard past it fails with ``ComfyUITimeoutError`` and its prompt is interrupted. If
        the caller is cancelled, the job's prompts are deleted or interrupted on every server
        before the cancellation goes on.
        """
        if self._http is None or self._plugins is None:
            raise RuntimeError("use ComfyAPI inside `async with`")
        started_at = trio.current_time()
        job_id = uuid.uuid4().hex[:12]
        self._ready_instances()  # fail at once rather than after waiting our turn
        # Checked and copied now: a bad param fails at once, and the job runs the workflow as
        # it is now, though it is planned only when its turn comes.
        checked = validate_params(self._plugins, workflow, params or {})
        workflow_json = workflow_snapshot(workflow)
        job_seed = job_seed_for(seed)
        await self._scheduler.admit(job_id)
        try:
            ready = self._ready_instances()
            plan: JobPlan = await plan_validated(
                self._plugins,
                workflow_json,
                checked,
                models=models,
                loras=loras,
                targets=ready,
                shard_count=len(ready),
                models_path=(
                    self.models_path if any(i.owned or i.is_local for i in ready) else None
                ),
                http=self._http,
                job_seed=job_seed,
            )
        except BaseException:
            self._scheduler.abandon(job_id)
            raise
        logger.info("job %s: %d shard(s) for %d instance(s)", job_id, len(plan.shards), len(ready))
        deadline = self.execution_timeout if timeout is None else timeout
        tasks = [ShardTask(job_id, shard.index, (shard, deadline)) for shard in plan.shards]
        self._scheduler.submit(job_id, tasks)
        finished = await self._scheduler.wait(job_id)
        outputs = [o for t in finished if not t.failed for o in t.outcome]
        failures = [
            ShardFailure(
                t.index,
                t.instance or "",
                t.prompt_id,
                t.outcome,
                tuple(t.outcome.outputs) if isinstance(t.outcome, ExecutionError) else (),
            )
            for t in finished
            if t.failed
        ]
        reports = [
            ShardReport(
                t.index,
                t.instance or "",
                t.prompt_id,
                dict(t.payload[0].scaled),
                dict(t.payload[0].seeds),
                t.started_at or t.enqueued_at,
                t.finished_at or trio.current_time(),
                not t.failed,
            )
            for t in finished
        ]
        result = JobResult(
            job_id=job_id,
            outputs=tuple(outputs),
            failures=tuple(failures),
            shards=tuple(reports),
            seed=plan.seed,
            started_at=started_at,
            finished_at=trio.current_time(),
        )
        if failures and len(failures) == len(plan.shards):
            first = failures[0].error
            if isinstance(first, ComfyAPIError):
                first.other_errors = [f.error for f in failures[1:]]
            raise first
        if failures:
            logger.warning(
                "job %s: %d/%d shard(s) failed; returning %d file(s)",
                job_id,
                len(failures),
                len(plan.shards),
                len(result.outputs),
            )
        logger.info(
            "job %s: done, %d file(s) in %.2f s",
            job_id,
            len(result.outputs),
            result.finished_at - started_at,
        )
        return result

    def _ready_instances(self) -> list[Instance]:
        """The instances ready now; ``ComfyAPIError`` when there are none."""
        ready = [i for i in self.instances if i.state == InstanceState.READY]
        if not ready:
            raise ComfyAPIError("no ComfyUI instance is ready to run the job")
        return ready

    async def _run_shard(self, instance: Instance, task: ShardTask) -> list[OutputFile]:
        """Run one shard on ``instance`` (the scheduler's runner). Its workflow is built
        here, when a server takes it, not while it waits in the queue."""
        shard, timeout = task.payload
        output_classes = await instance.output_node_classes()
        assert instance.client is not None
        try:
            prompt = shard.build()
            for node in prompt.values():
                if isinstance(node, dict) and node.get("class_type") in output_classes:
                    node.setdefault("inputs", {})[JOB_MARKER_INPUT] = task.prompt_id
            try:
                result = await instance.client.run(
                    prompt, prompt_id=task.prompt_id, timeout=timeout
                )
            except ExecutionError as exc:
                if exc.node_outputs:  # what it wrote before it failed is kept
                    exc.outputs = tuple(await self._collect_partial(exc, instance, task, timeout))
                raise
            return await self._collect_within(timeout, result, instance, task.job_id)
        except ComfyAPIError as exc:
            logger.error(
                "job %s: shard %d failed on %s: %s", task.job_id, task.index, instance.name, exc
            )
            raise

    async def _collect_within(
        self, timeout: float, result: PromptResult, instance: Instance, job_id: str
    ) -> list[OutputFile]:
        """``_collect`` in ``timeout`` seconds (the shard's): a server that sends its files
        too slowly fails the shard with ``ComfyUITimeoutError`` (no partial file is left)."""
        with trio.move_on_after(timeout):
            return await self._collect(result, instance, job_id)
        raise ComfyUITimeoutError(
            f"ComfyUI {instance.name}: the outputs of prompt {result.prompt_id} were not "
            f"downloaded in {timeout:g} s (the shard's timeout)",
            instance=instance.name,
            prompt_id=result.prompt_id,
            timeout=timeout,
        )

    async def _collect_partial(
        self, error: ExecutionError, instance: Instance, task: ShardTask, timeout: float
    ) -> list[OutputFile]:
        """The files a failed prompt wrote before it failed; none when they cannot be had
        (the prompt's error is the one to report)."""
        partial = PromptResult(instance.name, task.prompt_id, error.node_outputs)
        try:
            files = await self._collect_within(timeout, partial, instance, task.job_id)
        except ComfyAPIError as exc:
            logger.warning(
                "job %s: shard %d: the files written before it failed cannot be had: %s",
                task.job_id,
                task.index,
                exc,
            )
            return []
        logger.info(
            "job %s: shard %d failed after writing %d file(s)", task.job_id, task.index, len(files)
        )
        return files

    async def _collect(
        self, result: PromptResult, instance: Instance, job_id: str
    ) -> list[OutputFile]:
        """The shard's outputs as files here: read in place on a local instance, else
        downloaded, all of the shard's files at once (at most ``_DOWNLOADS_PER_SHARD``)."""
        folder = self.download_dir / job_id / re.sub(r"[^A-Za-z0-9_.-]", "_", instance.name)
        files = result.files  # walked once: each access reads the outputs again
        try:
            paths: list[Path | None] = [instance.local_path(ref) for ref in files]
            dests = {
                i: output_path(folder, ref.subfolder, ref.filename)
                for i, ref in enumerate(files)
                if paths[i] is None
            }
        except UnsafeNameError as exc:  # the server's names, not the caller's
            raise ServerProtocolError(
                instance.name,
                f"an output name {exc.name!r} would leave its folder",
                prompt_id=result.prompt_id,
            ) from exc
        missing = list(dests)
        if missing:
            client = instance.client
            assert client is not None
            limit = trio.Semaphore(_DOWNLOADS_PER_SHARD)

            def fetching(index: int) -> Callable[[], Awaitable[None]]:
                ref = files[index]

                async def fetch() -> None:
                    async with limit:
                        paths[index] = await client.download(
                            ref, dests[index], max_bytes=self.max_output_bytes
                        )

                return fetch

            if len(missing) == 1:
                await fetching(missing[0])()
            else:
                await run_concurrently(fetching(i) for i in missing)
        return [
            OutputFile(
                path=str(path),
                instance=instance.name,
                prompt_id=result.prompt_id,
                node_id=ref.node_id,
                filename=ref.filename,
                subfolder=ref.subfolder,
                type=ref.type,
            )
            for ref, path in zip(files, paths, strict=True)
        ]

    def statistics(self) -> ApiStatistics:
        """A frozen snapshot: per instance its state, prompts in flight, busy time, shards
        done and failed; per job its shards and when it was queued, started and finished;
        the number of shards waiting in the queue."""
        return self._scheduler.statistics(self.instances)

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
from ._errors import ComfyAPIError, unwrapped
from ._fleet import start_all, watch_capacity
from ._gpu import detect_gpus
from ._http import default_ssl_context
from ._instance import Instance, InstanceState
from ._jobs import OutputTask, ShardOutputs, ShardWork, job_result, run_shard
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


class WorkflowOptions(TypedDict, total=False):
    """The keywords of ``ComfyAPI.execute_workflow`` and ``check_workflow``
    (``run_workflow`` takes ``timeout`` too); each is optional."""

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
        ``params``, ``seed``, ``same_images``) are ``run_workflow``'s.

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
        async with self._scheduler.admit(job_id):
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
                same_images=same_images,
            )
            logger.info(
                "job %s: %d shard(s) for %d instance(s)", job_id, len(plan.shards), len(ready)
            )
            limit = self.execution_timeout if timeout is None else timeout
            shards: list[OutputTask] = [
                ShardTask(job_id, s.index, ShardWork(s, limit)) for s in plan.shards
            ]
            self._scheduler.submit(job_id, shards)
        finished = await self._scheduler.wait(job_id)
        return job_result(job_id, finished, seed=plan.seed, started_at=started_at, split=plan.split)

    async def check_workflow(
        self, workflow: Mapping[str, Any], **options: Unpack[WorkflowOptions]
    ) -> CheckReport:
        """A dry run of ``run_workflow`` (its keywords but ``timeout``): plan the job on the
        instances ready now and check each shard's workflow against every one's
        ``/object_info`` (node classes, required inputs, links, types, ranges, lists such as
        model files) and ``models`` against their ``/models`` lists. Returns a
        ``CheckReport``: the shards with their params and seeds, and every problem (a bad
        param, an unknown title, a wrong model name...), not just the first. Sends no
        prompt, uploads and downloads nothing (an image param is not prepared: see
        ``CheckReport.notes``). Raises only ``ValueError`` (a bad ``seed``) and, with no
        instance ready, ``ComfyAPIError``."""
        if self._http is None or self._plugins is None:
            raise RuntimeError("use ComfyAPI inside `async with`")
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
        )

    def _ready_instances(self) -> list[Instance]:
        """The instances ready now; ``ComfyAPIError`` when there are none."""
        ready = [i for i in self.instances if i.state == InstanceState.READY]
        if not ready:
            raise ComfyAPIError("no ComfyUI instance is ready to run the job")
        return ready

    async def _run_shard(self, instance: Instance, task: OutputTask) -> ShardOutputs:
        """The scheduler's runner: ``run_shard`` with the api's output settings."""
        collector = OutputCollector(self.download_dir, self.max_output_bytes)
        return await run_shard(instance, task, collector)

    def statistics(self) -> ApiStatistics:
        """A frozen snapshot: per instance its state, prompts in flight, busy time, shards
        done and failed; per job its shards and when it was queued, started and finished;
        the number of shards waiting in the queue."""
        return self._scheduler.statistics(self.instances)

"""Frozen values shared by the whole library: what to run, where, and what came out."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "ComfyUIInstance",
    "FaultPolicy",
    "GPUInfo",
    "JobResult",
    "LoRARef",
    "ModelRef",
    "OutputFile",
    "OutputValue",
    "RemoteComfyUI",
    "ShardFailure",
    "ShardReport",
]


@attrs.frozen
class ModelRef:
    """A model file that must exist before a workflow runs."""

    type: str
    """The models sub-folder, as ComfyUI names it: ``checkpoints``, ``vae``, ``loras``, ..."""
    name: str
    """The file name inside that folder (may hold sub-folders, never ``..``)."""


@attrs.frozen
class LoRARef:
    """A LoRA the workflow uses; downloaded into ``models_path/loras/`` when absent."""

    name: str
    """File name inside ``loras/`` (what the workflow's loader nodes receive)."""
    url: str
    """Where to download it from (http or https only)."""
    strength: float = 1.0
    """Model strength (and clip strength, unless ``strength_clip`` is given)."""
    sha256: str | None = None
    """Optional hex digest the downloaded bytes must match."""
    strength_clip: float | None = None
    """Clip strength for core ``LoraLoader`` nodes; defaults to ``strength``."""
    node_title: str | None = None
    """Title of the ``LoraLoader`` node this LoRA goes into (see the plugin guide)."""


@attrs.frozen
class GPUInfo:
    """What the machine offers: detected with NVML, or given by hand (tests, CPU boxes)."""

    cuda_available: bool
    """True when CUDA devices can be used; False runs ComfyUI with ``--cpu``."""
    device_count: int
    """How many devices (or CPU instances when ``cuda_available`` is False) to use."""


@attrs.frozen
class ComfyUIInstance:
    """One ComfyUI server: a local install (``path``) served on ``port``.

    Several instances may share one install: each gets its own input, output, temp and user
    folders and database under its state folder.
    """

    path: str | Path
    """The ComfyUI folder holding ``main.py``."""
    port: int
    """The port it listens on (on 127.0.0.1)."""
    python: str | None = None
    """The interpreter that runs ``main.py``; None means the current one."""
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """More command-line arguments for ComfyUI."""

    @property
    def base_url(self) -> str:
        """The HTTP address of the server."""
        return f"http://127.0.0.1:{self.port}"


@attrs.frozen
class OutputFile:
    """One file a prompt produced."""

    path: str
    """Where the file is on this machine (downloaded first for remote servers)."""
    instance: str
    """The name of the server that made it."""
    prompt_id: str
    """The prompt that made it."""
    node_id: str
    """The output node that reported it."""
    filename: str
    """ComfyUI's file name (``prefix_00001_.png``)."""
    subfolder: str
    """ComfyUI's sub-folder inside its output (or temp) folder."""
    type: str
    """``output`` (SaveImage), ``temp`` (PreviewImage), or ``websocket``: an image an output
    node sent over the websocket (SaveImageWebsocket), written by us into the download
    folder as ``ws_<prompt id>_<node id>_<index>.png`` (``filename``; ``subfolder`` empty)."""
    batch_index: int | None = None
    """Its index in the job's whole batch (0 .. N-1) when one ``gpu_scale`` param splits
    the batch and its node wrote one file per item of the shard's share: shard ``k..k+m-1``'s
    j-th file is ``k + j``. With ``JobResult.split == "same-images"`` it is the image of
    that index of the one-GPU run. None otherwise (no split param, or a node that wrote
    another number of files, such as a grid)."""


@attrs.frozen
class OutputValue:
    """What an output node reported that is not a file: ``PreviewAny``'s
    ``{"text": [...]}``, numbers, flags (one key of its ``ui`` output)."""

    shard: int
    """The index of the shard that made it."""
    instance: str
    """The server that ran it."""
    prompt_id: str
    """The prompt."""
    node_id: str
    """The output node."""
    key: str
    """The key of its ``ui`` output (``text``)."""
    values: tuple[Any, ...]
    """What it reported there, as ComfyUI sent it (JSON values)."""


@attrs.frozen
class RemoteComfyUI:
    """A ComfyUI server we do not start and whose disk we do not share.

    Inputs are uploaded with ``/upload/image``, outputs downloaded with ``/view``, models
    checked with ``/models/{folder}``.
    """

    url: str
    """Base URL, e.g. ``http://gpu-box-3:8188``."""
    name: str | None = None
    """A short name for logs and results (``host:port`` by default)."""
    ssl_context: ssl.SSLContext | None = None
    """For an ``https://`` server: checks its certificate (HTTP and websocket), e.g. one
    that trusts a private CA; None uses the system's CAs."""


@attrs.frozen
class ShardFailure:
    """One shard of a job that failed."""

    index: int
    """The shard's index in the job's split."""
    instance: str
    """The server it ran on."""
    prompt_id: str
    """Its prompt id."""
    error: BaseException
    """What went wrong (a ``ComfyAPIError``)."""
    outputs: tuple[OutputFile, ...] = ()
    """Files its nodes wrote before it failed (the error's ``outputs``, for an
    ``ExecutionError``): kept, not lost with the shard."""

    @property
    def node_id(self) -> str | None:
        """The node that failed, when ComfyUI said (an ``ExecutionError``)."""
        return getattr(self.error, "node_id", None)

    @property
    def node_type(self) -> str | None:
        """That node's class, when ComfyUI said."""
        return getattr(self.error, "node_type", None)

    @property
    def exception_type(self) -> str | None:
        """The exception the node raised (``interrupted`` for an interrupted prompt)."""
        return getattr(self.error, "exception_type", None) or None


@attrs.frozen
class ShardReport:
    """How one shard of a job went."""

    index: int
    """The shard's index in the job's split."""
    instance: str
    """The server it ran on."""
    prompt_id: str
    """Its prompt id."""
    scaled: dict[str, int]
    """Its share of every ``gpu_scale`` param."""
    seeds: dict[str, int]
    """The seed given to each seed node (by node title), and the seed each sampler draws
    its noise with where the job does not set it: kept from the workflow when the shards cut
    one batch (``LatentFromBatch``), its own per shard otherwise (``distinct-seeds``), by
    the sampler's title (``"TITLE (id N)"`` when titles repeat)."""
    batch_offset: int | None
    """Its first index in the job's whole batch (None without one ``gpu_scale`` param)."""
    submitted_at: float
    """``trio.current_time()`` when it was sent."""
    finished_at: float
    """``trio.current_time()`` when it ended."""
    ok: bool
    """True when it succeeded."""


@attrs.frozen
class JobResult:
    """Everything a job produced: outputs, failures, and how each shard went."""

    job_id: str
    """Our id for the job (also the marker that keeps its files apart)."""
    outputs: tuple[OutputFile, ...]
    """Every file produced, ordered by ``batch_index`` (files without one last), else
    shard by shard."""
    failures: tuple[ShardFailure, ...]
    """Every shard that failed."""
    shards: tuple[ShardReport, ...]
    """Every shard sent."""
    seed: int
    """The job seed (give it again to reproduce the run)."""
    started_at: float
    """``trio.current_time()`` when the job began."""
    finished_at: float
    """``trio.current_time()`` when it ended."""
    split: str = "single"
    """How the shards relate to one GPU's run: ``"single"`` (one shard, the workflow as
    given), ``"same-images"`` (the shards cut one batch with ``LatentFromBatch``: each
    output is the image of its ``batch_index`` in the one-GPU run, within a GPU's rounding),
    ``"distinct"`` (cut the same way, but a sampler that draws noise at every step, or a
    latent size torch draws differently, makes other images than one GPU: none repeats),
    ``"distinct-seeds"`` (each shard's samplers got their own seed: images differ),
    ``"unseeded"`` (nothing seeds the shards apart: a model-free workflow makes what its
    nodes make). See "Same images as one GPU" in docs/scheduling.md."""
    values: tuple[OutputValue, ...] = ()
    """What the output nodes of the shards that succeeded reported that is not a file
    (``PreviewAny``'s text, numbers), shard by shard."""

    @property
    def reproducible(self) -> bool:
        """True when the outputs are those of the job on one GPU (``split`` is
        ``"single"`` or ``"same-images"``)."""
        return self.split in ("single", "same-images")

    @property
    def paths(self) -> list[str]:
        """The paths of the ``output`` and ``websocket`` files (what ``execute_workflow``
        returns)."""
        return [o.path for o in self.outputs if o.type in ("output", "websocket")]

    @property
    def ok(self) -> bool:
        """True when no shard failed."""
        return not self.failures


@attrs.frozen
class FaultPolicy:
    """How comfytrio meets crashed, hung and restarted servers (``ComfyAPI(faults=...)``)."""

    max_shard_attempts: int = 3
    """A shard whose server went away or whose prompt vanished is sent again, up to this many
    attempts in all; then it fails with that error."""
    max_restarts: int = 5
    """How often a ComfyUI process of ours is restarted after it died, before its instance
    is given up (state ``failed``)."""
    restart_backoff: float = 1.0
    """Seconds before the first restart; doubled each time, at most 30."""
    health_interval: float = 5.0
    """Seconds between two ``/system_stats`` probes of each server."""
    hang_timeout: float = 60.0
    """A server that does not answer a probe in this many seconds is hung: ours is killed
    and restarted, a remote one takes no work until it answers again."""
    reconnect_timeout: float = 30.0
    """A websocket down this long fails the prompts in flight on that server (they run
    again elsewhere)."""
    no_instance_timeout: float = 120.0
    """When no instance has been able to take work for this long, the shards waiting in
    the queue fail with ``ServerLostError`` instead of waiting forever."""
    silence_timeout: float = 30.0
    """After this many seconds without news of a prompt, ``/queue`` and ``/history`` are
    asked where it is (a prompt deleted by someone else is found this way)."""

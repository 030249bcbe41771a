"""The plugin API of comfytrio: every hook, and what plugins register through them.

A plugin is a module (or any object) with functions marked ``@comfytrio.hookimpl`` whose names
are hooks below, made known through the ``comfytrio`` entry-point group::

    [project.entry-points.comfytrio]
    example = "comfytrio_example"

Hooks are synchronous. The registry hooks take a ``register`` callback and register objects
(``ParamType``, ``AssetResolver``, an ``OutputStore`` factory per URL scheme) whose methods
are ``async`` where they do I/O. The standard types, resolvers and stores
(``plugins/comfytrio_std``, entry point ``std``) use exactly this API. The guide with
examples is ``docs/plugins.md``.

How a job uses them (``plan_job``):

1. ``default_params`` adds params the caller did not give (the ``K - SEED`` seed).
2. Every param: its ``ParamType.validate``, then ``ParamType.input_for`` of each node it
   maps by plain title; every resolver: ``AssetResolver.check``. No I/O has happened yet,
   so a bad param never downloads anything.
3. One after another: ``ParamType.prepare`` once per param, then ``AssetResolver.resolve``
   once per resolver (downloads, uploads, model checks); each fans its own I/O out with
   ``run_concurrently``. The first error is raised and nothing runs.
4. Per shard: ``ParamType.split`` (``gpu_scale``), ``ParamType.shard_value``,
   ``ParamType.inject`` into each node mapped by title (``ParamType.inject_input`` into
   each ``"TITLE.INPUT"`` one), then ``AssetResolver.inject``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypedDict, Unpack

import attrs
import httpx
import pluggy

from ._concurrency import run_concurrently
from ._download import BodyCheck, Downloader, check_download_url, check_sha256, safe_join
from ._errors import ParamError, shown
from ._files import atomic_file
from ._scheduler import distribute
from ._types import LoRARef, ModelRef

__all__ = [
    "AssetResolver",
    "BaseAssetResolver",
    "BaseParamType",
    "BodyCheck",
    "Downloader",
    "InstanceTarget",
    "JobContext",
    "OutputStore",
    "Param",
    "ParamType",
    "Shard",
    "StoredOutput",
    "atomic_file",
    "check_download_url",
    "check_sha256",
    "default_params",
    "hookimpl",
    "hookspec",
    "infer_param_type",
    "register_asset_resolvers",
    "register_output_stores",
    "register_param_types",
    "run_concurrently",
    "safe_join",
    "shown",
]

hookspec = pluggy.HookspecMarker("comfytrio")
"""Marks the hook specifications below (for comfytrio itself)."""

hookimpl = pluggy.HookimplMarker("comfytrio")
"""Marks a plugin's implementation of a hook: ``@comfytrio.hookimpl``."""


# --------------------------------------------------------------------------- targets


class InstanceTarget(Protocol):
    """One ComfyUI server a job's shards may run on, as plugins see it.

    The orchestrator implements it; a param type uses it to place input files. ``name`` and
    ``input_dir`` may be plain attributes or read-only properties.
    """

    @property
    def name(self) -> str:
        """A short name for logs and errors, e.g. ``127.0.0.1:8188``."""
        ...

    @property
    def input_dir(self) -> Path | None:
        """The server's input folder on this machine, to write files into; None when remote."""
        ...

    async def upload_image(self, filename: str, data: bytes) -> str:
        """Upload ``data`` as ``filename`` (``POST /upload/image``); return the value to put
        into ``LoadImage.inputs.image``."""
        ...

    async def list_models(self, folder: str) -> list[str]:
        """The model files the server sees in ``folder`` (``GET /models/{folder}``)."""
        ...


# --------------------------------------------------------------------------- values


@attrs.frozen
class Param:
    """One validated entry of the ``params`` dict."""

    name: str
    """Its key in the ``params`` dict (errors name it)."""
    type: str
    """Its ``type`` (the name of the ``ParamType`` that handles it)."""
    value: Any
    """Its ``value`` as given (None when the entry has no ``value``)."""
    titles: tuple[str, ...]
    """The node titles its ``node_mappings`` name (a string gives one; ``"KSampler.steps"``
    gives ``"KSampler"`` when no node is titled ``"KSampler.steps"``)."""
    node_ids: tuple[str, ...]
    """The ids of every node whose ``_meta.title`` is one of ``titles``."""
    gpu_scale: bool = False
    """True when the value is split over the shards."""
    options: Mapping[str, Any] = attrs.field(factory=dict)
    """The entry's other keys (only those the type lists in ``options``)."""
    inputs: Mapping[str, str] = attrs.field(factory=dict)
    """The input a mapping names explicitly, by node id (``"KSampler.steps"``: the
    KSampler's id -> ``"steps"``): those nodes get ``inject_input``, the others (mapped by
    plain title, absent here) ``inject``."""


@attrs.frozen
class Shard:
    """Which shard a value is for."""

    index: int
    """Its index, from 0."""
    count: int
    """How many shards the job was split into (zero shares included)."""
    job_seed: int
    """The job's seed (``JobPlan.seed``): derive randomness from it to stay reproducible."""


class DownloadOptions(TypedDict, total=False):
    """The optional keywords of ``Downloader.download``, which ``JobContext.download`` passes
    on as they are."""

    sha256: str | None
    """The file's expected digest (hex)."""
    max_bytes: int | None
    """The size cap (None: the downloader's)."""
    timeout: float | None
    """Seconds for the whole transfer (None: the downloader's)."""
    check_body: BodyCheck | None
    """Why a body is not what the caller wants, or None when it is fine."""


@attrs.frozen(eq=False)
class JobContext:
    """What a job asks for and where it runs: handed to every param type and resolver.

    Read it; never change ``workflow`` (shards get their own copies).
    """

    workflow: Mapping[str, Any]
    """The job's workflow (API format): a copy of the caller's, taken when the job was called."""
    params: Mapping[str, Param]
    """Every validated param, the defaults included, by name."""
    models: tuple[ModelRef, ...]
    """The models the job needs."""
    loras: tuple[LoRARef, ...]
    """The LoRAs the job needs."""
    targets: tuple[InstanceTarget, ...]
    """Every server that may run a shard (input files go to all of them)."""
    shard_count: int
    """How many shards the job is split into."""
    models_path: Path | None
    """The local models root; None when every target is remote."""
    seed: int
    """The job seed (reported in ``JobPlan.seed``)."""
    http: httpx.AsyncClient
    """The api's shared HTTP client."""
    downloader: Downloader
    """The api's downloader (single-flight, capped, atomic)."""

    async def download(self, url: str, dest: Path, **options: Unpack[DownloadOptions]) -> bool:
        """``Downloader.download`` with the job's client, its keywords as they are
        (``sha256=None``, ``max_bytes=None``, ``timeout=None``, ``check_body=None``): fetch
        ``url`` into ``dest`` unless present, within ``timeout`` seconds (None: the
        downloader's); True when fetched. Whether fetched or present, the file must be a
        regular file, match ``sha256`` (when given) and pass ``check_body`` (when given).
        Raises ``DownloadError``."""
        return await self.downloader.download(self.http, url, dest, **options)

    async def fetch(
        self, url: str, *, max_bytes: int | None = None, timeout: float | None = None
    ) -> bytes:
        """``Downloader.fetch`` with the job's client: the body of ``url``, capped, within
        ``timeout`` seconds (None: the downloader's). Raises ``DownloadError``."""
        return await self.downloader.fetch(self.http, url, max_bytes=max_bytes, timeout=timeout)


# --------------------------------------------------------------------------- param types


class ParamType(Protocol):
    """Handles the params whose ``type`` is ``name``: validate, prepare, split, inject.

    Subclass ``BaseParamType`` rather than writing one from scratch.
    """

    name: str
    """The ``type`` value this handles (``"integer"``); unique among all plugins."""
    options: frozenset[str]
    """Keys a param entry may have besides ``type``, ``value``, ``node_mappings`` and
    ``gpu_scale``."""
    scalable: bool
    """True when ``gpu_scale`` is allowed."""
    reports_seed: bool
    """True when the values are seeds: the plan reports them in ``ShardPlan.seeds``."""

    def validate(self, param: Param) -> None:
        """Check the value, without I/O; raise ``ParamError(param.name, ...)``."""
        ...

    async def prepare(self, param: Param, job: JobContext) -> Any:
        """Once per job: do the I/O the value needs; return the prepared value."""
        ...

    def split(self, param: Param, prepared: Any, count: int) -> list[int]:
        """For ``gpu_scale``: one share per shard (``count`` of them, none negative)."""
        ...

    def shard_value(self, param: Param, prepared: Any, shard: Shard) -> Any:
        """The value one shard gets (when ``gpu_scale`` is off)."""
        ...

    def inject(self, node: dict[str, Any], value: Any, param: Param) -> None:
        """Put ``value`` into one node of a shard's workflow (a copy: change it freely)."""
        ...

    def input_for(self, node: Mapping[str, Any], param: Param) -> str | None:
        """The input of ``node`` that ``inject`` writes, checked when the param is validated:
        a node whose ``inputs`` lack it is refused (``NodeInputNotFoundError``, listing
        them). None: nothing to check. Only for nodes mapped by plain title."""
        ...

    def inject_input(self, node: dict[str, Any], input_name: str, value: Any, param: Param) -> None:
        """Put ``value`` into ``node["inputs"][input_name]``, an input the mapping names
        (``"KSampler.steps"``) and the node has (it may hold a link: the value replaces
        it)."""
        ...

    def parse_text(self, text: str, param_name: str) -> Any:
        """The value ``text`` stands for when typed on the command line (``comfytrio run
        --param "TITLE:TYPE=TEXT"``), without I/O; raise ``ParamError(param_name, ...)``
        when it cannot be one. ``validate`` still checks what this returns."""
        ...


class BaseParamType:
    """A ``ParamType`` whose value goes as is into ``inputs[input_name]`` of every mapped
    node. Override what differs; ``validate`` should call ``super().validate(param)``.
    """

    name: str
    """The ``type`` value this handles."""
    input_name: ClassVar[str] = "value"
    """The node input that receives the value."""
    options: frozenset[str] = frozenset()
    """Extra keys a param entry may have."""
    scalable: bool = False
    """True when ``gpu_scale`` is allowed (the shares then come from ``split``)."""
    reports_seed: bool = False
    """True when the values are seeds."""
    value_required: ClassVar[bool] = True
    """When True, an entry without ``value`` (or with None) is refused."""

    def validate(self, param: Param) -> None:
        """Refuse a missing value when ``value_required``."""
        if self.value_required and param.value is None:
            raise ParamError(param.name, f"a {self.name!r} param needs a 'value'")

    async def prepare(self, param: Param, job: JobContext) -> Any:
        """No I/O: the value as given."""
        return param.value

    def split(self, param: Param, prepared: Any, count: int) -> list[int]:
        """``distribute(prepared, count)``: the larger shares first, summing to the value."""
        return distribute(int(prepared), count)

    def shard_value(self, param: Param, prepared: Any, shard: Shard) -> Any:
        """The same value for every shard."""
        return prepared

    def inject(self, node: dict[str, Any], value: Any, param: Param) -> None:
        """``node["inputs"][input_name] = value``."""
        node.setdefault("inputs", {})[self.input_name] = value

    def input_for(self, node: Mapping[str, Any], param: Param) -> str | None:
        """``input_name``; None (no check) when a subclass overrides ``inject``, which then
        decides what it writes (override this too to have the plan check it)."""
        return self.input_name if type(self).inject is BaseParamType.inject else None

    def inject_input(self, node: dict[str, Any], input_name: str, value: Any, param: Param) -> None:
        """``node["inputs"][input_name] = value``."""
        node.setdefault("inputs", {})[input_name] = value

    def parse_text(self, text: str, param_name: str) -> Any:
        """The text as typed (a string value)."""
        return text


# --------------------------------------------------------------------------- resolvers


class AssetResolver(Protocol):
    """Makes sure the files a job needs are there (models, LoRAs), and may edit each shard's
    workflow to use them. Subclass ``BaseAssetResolver``.
    """

    name: str
    """A unique name among all plugins (``"models"``)."""

    def check(self, job: JobContext) -> None:
        """Before any I/O: refuse what can never work (unsafe names, bad URLs)."""
        ...

    async def resolve(self, job: JobContext) -> None:
        """Once per job: check, download, upload. Raise a ``ComfyAPIError``."""
        ...

    def inject(self, workflow: dict[str, Any], job: JobContext) -> None:
        """Edit one shard's workflow (a copy: change it freely)."""
        ...


class BaseAssetResolver:
    """An ``AssetResolver`` that does nothing: override the steps you need."""

    name: str
    """A unique name among all plugins."""

    def check(self, job: JobContext) -> None:
        """Nothing to check."""

    async def resolve(self, job: JobContext) -> None:
        """Nothing to fetch."""

    def inject(self, workflow: dict[str, Any], job: JobContext) -> None:
        """Nothing to change."""


# --------------------------------------------------------------------------- output stores


@attrs.frozen
class StoredOutput:
    """An output file kept in an ``OutputStore``, where every front end can serve it."""

    key: str
    """Its key in the store (``<job id>/<attempt>/<shard>-<node id>-<file name>``)."""
    url: str
    """Where a client fetches it (a ``file://`` path of a shared folder, a presigned or
    public ``https://`` URL of an object store)."""
    size: int
    """Its size in bytes."""
    content_type: str
    """Its media type."""


class OutputStore(Protocol):
    """Where a worker puts the outputs of the jobs it runs, so that any front end can hand
    them out (a shared folder, S3-compatible object storage...). Made by the factory a
    plugin registers for a URL scheme (``register_output_stores``); open one with
    ``Plugins.open_output_store(url)``.

    A key is a relative path, ``/`` between its parts, that follows ``safe_join``'s rule (no
    ``..``, no absolute path, no backslash, no empty part): every method refuses another
    with a ``ValueError`` naming it, before any I/O. A failure of the storage itself is a
    ``ComfyAPIError`` naming the store and the key."""

    scheme: ClassVar[str]
    """The URL scheme it serves (``file``, ``s3``)."""

    async def put(self, key: str, path: Path, *, content_type: str) -> StoredOutput:
        """Store the file at ``path`` under ``key`` (atomically: a reader never sees half of
        it; a key stored again is replaced); return where it is."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``KeyError`` when there are none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` (nothing when it is not there)."""
        ...


# --------------------------------------------------------------------------- hooks


@hookspec
def register_param_types(register: Callable[[ParamType], None]) -> None:
    """Register param types: call ``register(param_type)`` once for each.

    A ``type`` name registered twice (by any plugins) raises ``PluginError``.
    """


@hookspec
def register_asset_resolvers(register: Callable[[AssetResolver], None]) -> None:
    """Register asset resolvers: call ``register(resolver)`` once for each.

    A resolver name registered twice raises ``PluginError``.
    """


@hookspec
def register_output_stores(register: Callable[[str, Callable[[str], OutputStore]], None]) -> None:
    """Register output stores: call ``register(scheme, factory)`` once per URL scheme.

    ``factory(url)`` opens the store a URL of that scheme names (``Plugins.open_output_store``
    picks it; a plain absolute path counts as ``file``). It runs synchronously, once, when a
    worker or front end starts: parse and check the URL there (``ValueError`` for a bad
    one), do no network I/O. A scheme registered twice (by any plugins) raises
    ``PluginError``.
    """


@hookspec
def default_params(
    workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
) -> Mapping[str, Mapping[str, Any]] | None:
    """Params to add to a job the caller did not give, or None.

    ``params`` is what the caller gave; a returned entry whose name the caller already uses is
    dropped. Entries are validated like the caller's (their errors name them).
    """


@hookspec(firstresult=True)
def infer_param_type(workflow: Mapping[str, Any], title: str, text: str) -> str | None:
    """The param type of ``--param "TITLE=TEXT"`` on the command line (no ``:TYPE``), for
    the node(s) titled ``title`` of ``workflow``; None leaves it to the next plugin.

    The first answer wins: pluggy calls the plugin registered last first, and the standard
    plugin answers last (``trylast``), for every title. ``title`` may match no node (the
    command then reports it with the titles that exist); ``text`` is the value as typed,
    before the type's ``parse_text``.
    """

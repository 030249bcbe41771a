"""The standard plugin of comfytrio (entry point ``std``): param types, asset resolvers and
output stores.

Param types: ``integer``, ``string``, ``float``, ``boolean``, ``seed`` and ``image``.
Resolvers: ``models`` (every ``ModelRef`` exists), ``lora-downloads`` (missing LoRAs are
fetched) and ``lora-loaders`` (LoRAs go into the workflow's loader nodes). It also seeds the
node titled ``K - SEED`` when no param does (``default_params``), and says which of its
types ``comfytrio run --param "TITLE=VALUE"`` gives a node (``infer_param_type``). Output
stores: ``file`` (a folder every box mounts) and ``s3`` (S3-compatible object storage; boto3
is imported only when one is opened).

comfytrio's core never imports this package: it is found through its entry point, like any
third-party plugin. Block it with ``COMFYTRIO_BLOCK_PLUGINS=std``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from comfytrio import hookimpl
from comfytrio.hookspecs import AssetResolver, OutputStore, ParamType

from ._image import DEFAULT_MAX_IMAGE_BYTES, ImageType, image_extension
from ._infer import PARAM_TYPE_BY_CLASS, param_type_for, type_of_text
from ._loras import (
    MIN_LORA_BYTES,
    LoraDownloads,
    LoraLoaders,
    assign_loras,
    lora_body_check,
    lora_body_problem,
)
from ._models import ModelCheck
from ._params import (
    DEFAULT_SEED_TITLE,
    BooleanType,
    FloatType,
    IntegerType,
    SeedType,
    StringType,
    default_seed_param,
)
from ._stores import (
    DEFAULT_S3_THREADS,
    DEFAULT_URL_EXPIRES,
    FolderStore,
    OutputKeyError,
    OutputStoreError,
    S3Store,
    check_key,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_S3_THREADS",
    "DEFAULT_SEED_TITLE",
    "DEFAULT_URL_EXPIRES",
    "MIN_LORA_BYTES",
    "PARAM_TYPE_BY_CLASS",
    "BooleanType",
    "FloatType",
    "FolderStore",
    "ImageType",
    "IntegerType",
    "LoraDownloads",
    "LoraLoaders",
    "ModelCheck",
    "OutputKeyError",
    "OutputStoreError",
    "S3Store",
    "SeedType",
    "StringType",
    "assign_loras",
    "check_key",
    "default_params",
    "image_extension",
    "infer_param_type",
    "lora_body_check",
    "lora_body_problem",
    "param_type_for",
    "register_asset_resolvers",
    "register_output_stores",
    "register_param_types",
    "type_of_text",
]


@hookimpl
def register_param_types(register: Callable[[ParamType], None]) -> None:
    """``integer``, ``string``, ``float``, ``boolean``, ``seed`` and ``image``."""
    for param_type in (
        IntegerType(),
        StringType(),
        FloatType(),
        BooleanType(),
        SeedType(),
        ImageType(),
    ):
        register(param_type)


@hookimpl
def register_asset_resolvers(register: Callable[[AssetResolver], None]) -> None:
    """``models``, ``lora-downloads`` and ``lora-loaders``."""
    for resolver in (ModelCheck(), LoraDownloads(), LoraLoaders()):
        register(resolver)


@hookimpl
def register_output_stores(register: Callable[[str, Callable[[str], OutputStore]], None]) -> None:
    """``file`` (``FolderStore``) and ``s3`` (``S3Store``)."""
    register("file", FolderStore.from_url)
    register("s3", S3Store.from_url)


@hookimpl
def default_params(
    workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
) -> Mapping[str, Mapping[str, Any]] | None:
    """A ``seed`` param for the node titled ``K - SEED`` when no param of the caller sets it."""
    return default_seed_param(workflow, params)


@hookimpl(trylast=True)
def infer_param_type(workflow: Mapping[str, Any], title: str, text: str) -> str | None:
    """``K - SEED`` and samplers: ``seed``; ``PrimitiveInt``: ``integer``, ``LoadImage``:
    ``image``...; a title matching no node: what the text looks like (``param_type_for``).
    Asked last, so another plugin's answer wins."""
    return param_type_for(workflow, title, text)

"""The plugins a dry run plans with: the api's own, with the I/O of ``prepare`` and
``resolve`` taken out (``ComfyAPI.check_workflow``)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from ._plugins import Plugins
from .hookspecs import AssetResolver, BaseParamType, JobContext, Param, ParamType, Shard

__all__ = ["DryPlugins"]


class _Unprepared:
    """A param type as a dry run uses it: ``prepare`` runs only where it is the base's (the
    value as given, no I/O); anything else gets a placeholder and a note."""

    def __init__(self, real: ParamType, notes: dict[str, str]) -> None:
        self.real = real
        self.name = real.name
        self.options = real.options
        self.scalable = real.scalable
        self.reports_seed = real.reports_seed
        self.notes = notes

    def validate(self, param: Param) -> None:
        self.real.validate(param)

    async def prepare(self, param: Param, job: JobContext) -> Any:
        if getattr(type(self.real), "prepare", None) is BaseParamType.prepare:
            return await self.real.prepare(param, job)
        self.notes[param.name] = (
            f"param {param.name!r} ({param.type}): not prepared in a dry run (nothing is "
            "fetched or uploaded), so the inputs it sets are not checked"
        )
        return param.value if param.gpu_scale else f"<{param.type} not uploaded in a dry run>"

    def split(self, param: Param, prepared: Any, count: int) -> list[int]:
        return self.real.split(param, prepared, count)

    def shard_value(self, param: Param, prepared: Any, shard: Shard) -> Any:
        return self.real.shard_value(param, prepared, shard)

    def inject(self, node: dict[str, Any], value: Any, param: Param) -> None:
        self.real.inject(node, value, param)

    def input_for(self, node: Mapping[str, Any], param: Param) -> str | None:
        return self.real.input_for(node, param)

    def inject_input(self, node: dict[str, Any], input_name: str, value: Any, param: Param) -> None:
        self.real.inject_input(node, input_name, value, param)

    def parse_text(self, text: str, param_name: str) -> Any:
        return self.real.parse_text(text, param_name)


class _Unresolved:
    """An asset resolver as a dry run uses it: ``check`` and ``inject``, never ``resolve``
    (which downloads and asks the servers)."""

    def __init__(self, real: AssetResolver) -> None:
        self.real = real
        self.name = real.name

    def check(self, job: JobContext) -> None:
        self.real.check(job)

    async def resolve(self, job: JobContext) -> None:
        """Nothing: a dry run downloads nothing."""

    def inject(self, workflow: dict[str, Any], job: JobContext) -> None:
        self.real.inject(workflow, job)


class DryPlugins(Plugins):
    """The api's plugins with the I/O of ``prepare`` and ``resolve`` taken out."""

    def __init__(self, real: Plugins, notes: dict[str, str]) -> None:
        super().__init__(real.manager, real.downloader)
        self._dry_types = types.MappingProxyType(
            {name: _Unprepared(t, notes) for name, t in real.param_types().items()}
        )
        self._dry_resolvers = [_Unresolved(r) for r in real.asset_resolvers()]

    def param_types(self) -> Mapping[str, ParamType]:
        return self._dry_types

    def asset_resolvers(self) -> list[AssetResolver]:
        return list(self._dry_resolvers)

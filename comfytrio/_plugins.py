"""The plugin manager: a factory (no import-time global) and a typed wrapper over its hooks.

Every plugin, the standard ones (entry point ``std``) included, comes in through the
``comfytrio`` entry-point group and ``pm.register``; the core never imports a plugin. Only
this module calls the untyped ``pm.hook`` relay.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import pluggy

from . import hookspecs
from ._download import DEFAULT_DOWNLOAD_TIMEOUT, DEFAULT_MAX_DOWNLOAD_BYTES, Downloader
from ._errors import ComfyAPIError, PluginError, UnknownParamTypeError
from .hookspecs import AssetResolver, OutputStore, ParamType

__all__ = ["BLOCK_ENV_VAR", "ENTRY_POINT_GROUP", "PluginEntry", "Plugins", "make_plugin_manager"]

logger = logging.getLogger("comfytrio.plugins")

ENTRY_POINT_GROUP = "comfytrio"
"""The entry-point group plugins declare themselves in."""

BLOCK_ENV_VAR = "COMFYTRIO_BLOCK_PLUGINS"
"""Comma-separated plugin names never to load (``COMFYTRIO_BLOCK_PLUGINS=example,std``)."""

_PARAM_TYPE_METHODS = ("validate", "prepare", "split", "shard_value", "inject", "parse_text")
_RESOLVER_METHODS = ("check", "resolve", "inject")
_OUTPUT_STORE_METHODS = ("put", "get", "delete")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")

OutputStoreFactory = Callable[[str], OutputStore]
"""What ``register_output_stores`` registers per scheme: opens the store a URL names."""


def _env_blocked() -> set[str]:
    raw = os.environ.get(BLOCK_ENV_VAR, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _scheme_of(url: str) -> str:
    """The scheme of an output store's URL, lower-cased; ``file`` for a plain absolute path."""
    if url.startswith("/"):
        return "file"
    return urlsplit(url).scheme.lower()


def _shown_url(url: str) -> str:
    """``url`` for an error message, its password (if any) hidden."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return parts._replace(
                netloc=parts.netloc.replace(f":{parts.password}@", ":***@")
            ).geturl()
    except ValueError:
        pass
    return url


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line, without RST
    literals."""
    paragraph = " ".join((doc or "").strip().split("\n\n", 1)[0].split())
    sentence = paragraph.replace("``", "").split(". ", 1)[0]
    return sentence if sentence.endswith(".") or not sentence else sentence + "."


def make_plugin_manager(
    *,
    entrypoints: bool = True,
    blocked: Iterable[str] | None = None,
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
) -> Plugins:
    """Make a fresh plugin manager (each call is independent: tests get their own).

    ``entrypoints``: load every plugin of the ``comfytrio`` entry-point group (the standard
    ``std`` plugin is one of them); False gives an empty manager to ``register`` into.
    ``blocked``: plugin names never to load, added to those of ``COMFYTRIO_BLOCK_PLUGINS``.
    ``max_download_bytes``: the default size cap of the downloader plugins use;
    ``download_timeout``: its default deadline of one download, in seconds (an hour).

    Raises ``PluginError``: two entry points with one name, a plugin that fails to import,
    an unknown hook (``check_pending``), a param type or resolver name or output store scheme
    registered twice.
    """
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    for name in _env_blocked() | set(blocked or ()):
        manager.set_blocked(name)
    plugins = Plugins(manager, Downloader(max_bytes=max_download_bytes, timeout=download_timeout))
    if entrypoints:
        plugins.load_entrypoints()
    plugins.refresh()
    return plugins


@attrs.frozen
class PluginEntry:
    """One registered param type, asset resolver or output store, as ``Plugins.describe``
    lists it."""

    kind: str
    """``param type``, ``asset resolver`` or ``output store``."""
    name: str
    """Its name (a param's ``type``, the resolver's name, or the store's URL scheme)."""
    plugin: str
    """The plugin that registered it (its entry-point name)."""
    distribution: str
    """The installed distribution and version it comes from."""
    summary: str
    """The first sentence of its docstring."""


class Plugins:
    """The plugins of one api, with typed access to every hook.

    Registry hooks are called once (and again after ``register``/``unregister``), so the
    registered objects and the ``downloader`` live as long as this object.
    """

    def __init__(self, manager: pluggy.PluginManager, downloader: Downloader) -> None:
        self.manager = manager
        """The underlying pluggy manager (call hooks through this class, not its relay)."""
        self.downloader = downloader
        """The downloader every job of this manager shares (single-flight per file)."""
        self._param_types: dict[str, ParamType] = {}
        self._resolvers: dict[str, AssetResolver] = {}
        self._output_stores: dict[str, OutputStoreFactory] = {}
        self._owners: dict[tuple[str, str], str] = {}  # (kind, name) -> plugin name
        self._distributions: dict[str, str] = {}  # plugin name -> "distribution version"

    # ------------------------------------------------------------------ registration

    def load_entrypoints(self) -> list[str]:
        """Register every plugin of the ``comfytrio`` entry-point group that is not blocked;
        return their names. Raises ``PluginError`` for two entry points with one name or a
        plugin that fails to import."""
        loaded: list[str] = []
        seen: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "?"
            if ep.name in seen:
                raise PluginError(
                    f"two plugins are named {ep.name!r}: one from {seen[ep.name]}, one from {dist}"
                )
            seen[ep.name] = dist
            if self.manager.is_blocked(ep.name):
                logger.info("plugin %s (%s) is blocked", ep.name, dist)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r} ({dist}) failed to import: {exc!r}") from exc
            self._register(plugin, ep.name)
            self._distributions[ep.name] = dist
            logger.debug("plugin %s loaded from %s (%s)", ep.name, ep.value, dist)
            loaded.append(ep.name)
        return loaded

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin (a module or an object with hook implementations) by hand,
        through the same path as entry points, then rebuild the registries.

        Raises ``PluginError`` (and leaves the manager as it was): a name already in use or
        blocked, an unknown hook, a param type or resolver name or an output
        store scheme registered twice.
        """
        registered = self._register(plugin, name)
        try:
            self.refresh()
        except PluginError:
            self.manager.unregister(name=registered)
            self.refresh()
            raise

    def unregister(self, name: str) -> None:
        """Remove the plugin registered as ``name`` and rebuild the registries."""
        self.manager.unregister(name=name)
        self.refresh()

    def _register(self, plugin: object, name: str | None) -> str:
        if name is not None and self.manager.is_blocked(name):
            raise PluginError(f"plugin {name!r} is blocked")
        try:
            registered = self.manager.register(plugin, name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc
        if registered is None:  # pragma: no cover - blocked between the check and here
            raise PluginError(f"plugin {name!r} is blocked")
        return registered

    def names(self) -> list[str]:
        """The names of the registered plugins, sorted."""
        return sorted(name for name, plugin in self.manager.list_name_plugin() if plugin)

    def refresh(self) -> None:
        """Check every hook implementation (``check_pending``) and rebuild the registries.

        Raises ``PluginError`` for an implementation of an unknown hook, or a name (or scheme)
        registered twice.
        """
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r}: {exc}") from exc
        self._owners = {}
        self._param_types = self._collect("register_param_types", "param type", _PARAM_TYPE_METHODS)
        self._resolvers = self._collect(
            "register_asset_resolvers", "asset resolver", _RESOLVER_METHODS
        )
        self._output_stores = self._collect_output_stores()

    def _collect(self, hook_name: str, what: str, methods: tuple[str, ...]) -> dict[str, Any]:
        # Each implementation is called on its own so that an error names its plugin.
        found: dict[str, Any] = {}
        owners: dict[str, str] = {}
        caller = getattr(self.manager.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's call order
            if impl.hookwrapper or impl.wrapper:
                continue
            plugin_name = impl.plugin_name

            def register(obj: Any, plugin_name: str = plugin_name) -> None:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"plugin {plugin_name!r} registered a {what} without a name: {obj!r}"
                    )
                missing = [m for m in methods if not callable(getattr(obj, m, None))]
                if missing:
                    raise PluginError(
                        f"plugin {plugin_name!r}: {what} {name!r} lacks {', '.join(missing)}"
                    )
                if name in found:
                    raise PluginError(
                        f"{what} {name!r} is registered twice: by plugin {owners[name]!r} "
                        f"and by plugin {plugin_name!r}"
                    )
                found[name] = obj
                owners[name] = plugin_name
                self._owners[(what, name)] = plugin_name

            arguments = {"register": register}
            impl.function(*[arguments[arg] for arg in impl.argnames])
        return found

    def _collect_output_stores(self) -> dict[str, OutputStoreFactory]:
        # Like _collect, but a store is registered as (scheme, factory): the factory opens
        # one store per URL, so there is no object to take a name from.
        found: dict[str, OutputStoreFactory] = {}
        for impl in reversed(self.manager.hook.register_output_stores.get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                continue
            plugin_name = impl.plugin_name

            def register(scheme: object, factory: object, plugin_name: str = plugin_name) -> None:
                if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
                    raise PluginError(
                        f"plugin {plugin_name!r} registered an output store for {scheme!r}, "
                        "not a lower-case URL scheme"
                    )
                if not callable(factory):
                    raise PluginError(
                        f"plugin {plugin_name!r}: the output store factory of {scheme!r} is "
                        f"not callable: {factory!r}"
                    )
                if scheme in found:
                    owner = self._owners[("output store", scheme)]
                    raise PluginError(
                        f"output store scheme {scheme!r} is registered twice: by plugin "
                        f"{owner!r} and by plugin {plugin_name!r}"
                    )
                found[scheme] = factory
                self._owners[("output store", scheme)] = plugin_name

            arguments = {"register": register}
            impl.function(*[arguments[arg] for arg in impl.argnames])
        return found

    # ------------------------------------------------------------------ typed hooks

    def describe(self) -> list[PluginEntry]:
        """One entry per registered param type, asset resolver and output store: what
        registered it, from which distribution, and the first sentence of its docstring (an
        output store's: its factory's) (``comfytrio plugins``)."""
        entries = []
        registries: tuple[tuple[str, Mapping[str, Any]], ...] = (
            ("param type", self._param_types),
            ("asset resolver", self._resolvers),
            ("output store", self._output_stores),
        )
        for kind, registry in registries:
            for name, obj in registry.items():
                plugin = self._owners.get((kind, name), "?")
                doc = obj.__doc__ if kind == "output store" else type(obj).__doc__
                entries.append(
                    PluginEntry(
                        kind=kind,
                        name=name,
                        plugin=plugin,
                        distribution=self._distributions.get(plugin, "registered by hand"),
                        summary=_summary(doc),
                    )
                )
        return entries

    def param_types(self) -> Mapping[str, ParamType]:
        """Every registered param type, by ``type`` name (a read-only view)."""
        return types.MappingProxyType(self._param_types)

    def asset_resolvers(self) -> list[AssetResolver]:
        """Every registered asset resolver, in hook call order (the last plugin first)."""
        return list(self._resolvers.values())

    def output_store_schemes(self) -> list[str]:
        """The URL schemes of every registered output store, sorted (``["file", "s3"]``)."""
        return sorted(self._output_stores)

    def open_output_store(self, url: str) -> OutputStore:
        """Open the output store ``url`` names, with the factory registered for its scheme
        (``register_output_stores``); a plain absolute path is a ``file`` store. Call it
        once, at start-up: a factory may read configuration, synchronously.

        Raises ``PluginError`` naming the URL and the installed schemes when no plugin
        serves its scheme, or naming the plugin when its factory fails with anything but a
        ``ComfyAPIError`` or a ``ValueError`` (which a factory raises for a URL it refuses,
        and which pass as they are) or returns no store.
        """
        scheme = _scheme_of(url)
        factory = self._output_stores.get(scheme)
        if factory is None:
            installed = ", ".join(self.output_store_schemes()) or "none"
            raise PluginError(
                f"no output store for {_shown_url(url)!r}: no plugin serves the scheme "
                f"{scheme or '(none)'!r}; installed schemes: {installed}"
            )
        plugin = self._owners.get(("output store", scheme), "?")
        try:
            store = factory(url)
        except (ComfyAPIError, ValueError):
            raise
        except Exception as exc:
            raise PluginError(
                f"output store {scheme!r} (plugin {plugin!r}) failed to open "
                f"{_shown_url(url)!r}: {exc!r}"
            ) from exc
        missing = [m for m in _OUTPUT_STORE_METHODS if not callable(getattr(store, m, None))]
        if missing:
            raise PluginError(
                f"output store {scheme!r} (plugin {plugin!r}) opened {store!r}, which lacks "
                f"{', '.join(missing)}"
            )
        return store

    def _call(self, hook_name: str, **arguments: Any) -> Any:
        """Call a hook; an exception other than a ``ComfyAPIError`` is a ``PluginError``."""
        try:
            return getattr(self.manager.hook, hook_name)(**arguments)
        except ComfyAPIError:
            raise
        except Exception as exc:
            raise PluginError(f"a plugin's {hook_name} hook failed: {exc!r}") from exc

    def default_params(
        self, workflow: Mapping[str, Any], params: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Mapping[str, Any]]:
        """The params plugins add to a job (``default_params`` hook), minus the names the
        caller already uses. The first plugin to give a name wins.

        Raises ``PluginError`` when a hook fails with anything but a ``ComfyAPIError`` or
        returns something other than a dict (or None): whatever the caller's input, a
        plugin's bug is reported as one."""
        extra: dict[str, Mapping[str, Any]] = {}
        results: list[object] = self._call("default_params", workflow=workflow, params=params)
        for result in results:
            if result is None:
                continue
            if not isinstance(result, Mapping):
                raise PluginError(
                    f"a default_params hook returned a {type(result).__name__}, not a dict"
                )
            for name, entry in result.items():
                if name not in params and name not in extra:
                    extra[name] = entry
        return extra

    def infer_param_type(self, workflow: Mapping[str, Any], title: str, text: str) -> str | None:
        """The type plugins give ``--param "TITLE=TEXT"`` (``infer_param_type`` hook: the
        first answer wins), or None when no plugin answers.

        Raises ``PluginError`` when a hook fails with anything but a ``ComfyAPIError`` or
        answers something other than a type name."""
        result: object = self._call("infer_param_type", workflow=workflow, title=title, text=text)
        if result is not None and not (isinstance(result, str) and result):
            raise PluginError(f"an infer_param_type hook returned {result!r}, not a type name")
        return result

    def parse_text(self, type_name: str, text: str, param_name: str) -> Any:
        """The value of a ``type_name`` param named ``param_name`` typed as ``text`` on the
        command line: that type's ``parse_text``.

        Raises ``UnknownParamTypeError`` (listing the installed types) when no plugin
        provides ``type_name``, the type's ``ParamError`` for text it refuses, and
        ``PluginError`` naming the type and its plugin when ``parse_text`` fails with
        anything but a ``ComfyAPIError``."""
        param_type = self._param_types.get(type_name)
        if param_type is None:
            raise UnknownParamTypeError(param_name, type_name, list(self._param_types))
        try:
            return param_type.parse_text(text, param_name)
        except ComfyAPIError:
            raise
        except Exception as exc:
            plugin = self._owners.get(("param type", type_name), "?")
            raise PluginError(
                f"param type {type_name!r} (plugin {plugin!r}) failed to parse "
                f"{text!r} for param {param_name!r}: {exc!r}"
            ) from exc

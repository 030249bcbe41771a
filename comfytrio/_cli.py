"""The ``comfytrio`` command line: ``run``, ``demo``, ``doctor`` and ``fake-server``.

Each sub-command is one ``_Command``: a function that adds its arguments to its parser and
a function that runs it and returns the exit code. Register new ones in ``COMMANDS``.

Exit codes: 0 success, 1 the job (or a check) failed, 2 a usage error (bad arguments, a bad
param, a workflow that cannot be read), 130 interrupted (Ctrl-C). Results go to stdout
(paths, or JSON with ``--json``); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import signal
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import attrs
import httpx
import trio
from rich.console import Console
from rich.logging import RichHandler

from . import __version__, _gpu
from ._api import ComfyAPI
from ._errors import (
    ComfyAPIError,
    ExecutionError,
    ParamError,
    PluginError,
    UnknownParamTypeError,
    single_error,
    unwrapped,
)
from ._gpu import detect_gpus
from ._plan import MAX_SEED, validate_params
from ._plugins import Plugins, make_plugin_manager
from ._progress import Display, LineDisplay, LiveDisplay, follow_progress
from ._types import ComfyUIInstance, GPUInfo, JobResult, LoRARef, ModelRef, OutputFile
from ._workflow import node_ids_by_title

__all__ = [
    "COMMANDS",
    "UsageError",
    "build_params",
    "build_parser",
    "infer_param_type",
    "load_param_file",
    "load_workflow",
    "main",
    "parse_lora",
    "parse_model",
    "parse_value",
]

EXIT_OK = 0
"""Everything worked."""
EXIT_FAILED = 1
"""The job failed (or some of its shards did), or doctor found a problem."""
EXIT_USAGE = 2
"""The command line, a param or the workflow file is wrong."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT); SIGTERM and SIGHUP give 128 + their number."""

SEED_TITLE = "K - SEED"
"""The node title the standard plugin seeds by default (a ``seed`` param when named)."""

PARAM_TYPE_BY_CLASS: dict[str, str] = {
    "PrimitiveInt": "integer",
    "PrimitiveFloat": "float",
    "PrimitiveString": "string",
    "PrimitiveStringMultiline": "string",
    "PrimitiveBoolean": "boolean",
    "LoadImage": "image",
    "LoadImageMask": "image",
}
"""The param type ``--param TITLE=VALUE`` gets for a node of each class."""

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class UsageError(Exception):
    """The command line is wrong (exit code 2); the message says what to fix."""


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ReportedByUs(logging.Filter):
    """Drops the api's record of each failed shard: the command prints every error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "comfytrio" and str(record.msg).startswith("job %s: shard"))


def _setup_logging(verbose: int, console: Console | None = None) -> None:
    """WARNING by default, INFO with ``-v``, DEBUG with ``-vv`` (the ComfyUI logs too).

    With a live display, records go through rich's handler on the same console, so they
    print above the table instead of tearing it.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if console is not None:
        handler = RichHandler(console=console, show_path=False, show_time=verbose > 1)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if verbose <= 0:
        handler.addFilter(_ReportedByUs())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


# ====================================================================== workflow and params


def load_workflow(path: Path) -> dict[str, Any]:
    """Read an API-format workflow (exported with "Save (API)"); a ``{"prompt": {...}}``
    body is accepted too.

    Raises ``UsageError`` for a missing file, bad JSON, or a UI-format workflow.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"workflow {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"workflow {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"workflow {path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise UsageError(
            f"workflow {path} is in ComfyUI's UI format: export it with "
            '"Save (API)" (Workflow menu > Export (API)) and give that file'
        )
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(n, dict) and "class_type" in n for n in data.values())
    ):
        raise UsageError(
            f"workflow {path} is not an API-format workflow (node id -> "
            '{"class_type", "inputs", "_meta"}): export it with "Save (API)"'
        )
    return data


def load_param_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a params file in the seed library's format::

        {"steps": {"type": "integer", "value": 20, "node_mappings": "API - STEP",
                   "gpu_scale": false}}

    Raises ``UsageError`` when it cannot be read or is not a JSON object of objects (each
    entry is checked later, with the workflow, by ``validate_params``).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--param-file {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"--param-file {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"--param-file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(
            f"--param-file {path}: expects a JSON object of params, e.g. "
            '{"steps": {"type": "integer", "value": 20, "node_mappings": "API - STEP"}}'
        )
    return {str(k): dict(v) for k, v in data.items()}


def _nodes_titled(workflow: Mapping[str, Any], title: str) -> list[Mapping[str, Any]]:
    return [workflow[i] for i in node_ids_by_title(workflow, title)]


def _type_of_text(text: str) -> str:
    try:
        int(text)
        return "integer"
    except ValueError:
        pass
    try:
        number = float(text)
        if math.isfinite(number):
            return "float"
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return "boolean"
    return "string"


def infer_param_type(workflow: Mapping[str, Any], title: str, text: str) -> str:
    """The param type for ``--param TITLE=TEXT``: from the node titled ``TITLE``.

    ``K - SEED`` and sampler nodes (a ``seed``/``noise_seed`` input) are ``seed``;
    ``PrimitiveInt`` -> ``integer``, ``PrimitiveFloat`` -> ``float``, ``PrimitiveString`` ->
    ``string``, ``PrimitiveBoolean`` -> ``boolean``, ``LoadImage`` -> ``image``; another node
    with a ``value`` input gets the type of its current value; else the text decides
    (``20`` integer, ``0.5`` float, ``true`` boolean, anything else string).
    """
    if title == SEED_TITLE:
        return "seed"
    for node in _nodes_titled(workflow, title)[:1]:
        class_type = node.get("class_type")
        if isinstance(class_type, str) and class_type in PARAM_TYPE_BY_CLASS:
            return PARAM_TYPE_BY_CLASS[class_type]
        inputs = node.get("inputs")
        inputs = inputs if isinstance(inputs, Mapping) else {}
        if "value" not in inputs and ("seed" in inputs or "noise_seed" in inputs):
            return "seed"
        value = inputs.get("value")
        if isinstance(value, bool):
            return "boolean"
        if isinstance(value, int):
            return "integer"
        if isinstance(value, float):
            return "float"
        if isinstance(value, str):
            return "string"
    return _type_of_text(text)


def parse_value(name: str, type_name: str, text: str) -> Any:
    """Turn the text of ``--param`` into the value a ``type_name`` param takes.

    ``integer`` and ``seed``: an int; ``float``: a number; ``boolean``: true/false (also
    yes/no, on/off, 1/0); ``string``, ``image`` (a path or URL) and plugin types: the text.
    Raises ``ParamError`` naming the param when the text does not fit.
    """
    if type_name in ("integer", "seed"):
        try:
            return int(text)
        except ValueError:
            raise ParamError(name, f"expects an integer, got {text!r}") from None
    if type_name == "float":
        try:
            return float(text)
        except ValueError:
            raise ParamError(name, f"expects a number, got {text!r}") from None
    if type_name == "boolean":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ParamError(name, f"expects true or false, got {text!r}")
    return text


def _split_assignment(flag: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f'{flag} expects TITLE=VALUE (e.g. {flag} "API - STEP=20"), got {text!r}')
    return key, value


def build_params(
    workflow: Mapping[str, Any],
    assignments: Iterable[tuple[str, str]],
    *,
    file_params: Mapping[str, Mapping[str, Any]] | None = None,
    known_types: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """The ``params`` dict from a params file plus ``--param``/``--scale`` assignments.

    ``assignments`` are ``(flag, "KEY=VALUE")`` pairs in command-line order, ``flag`` being
    ``--param`` or ``--scale`` (``--scale`` also sets ``gpu_scale``). ``KEY`` is, in order:
    the name of a params-file entry (its value is replaced), the title an entry maps to (the
    same), a node title of the workflow (a new param of that name, its type inferred by
    ``infer_param_type``), or ``TITLE:TYPE`` with ``TYPE`` one of ``known_types`` (a new
    param of that explicit type). A key that is none of these becomes a param for that title,
    so ``validate_params`` reports it with the titles that exist.

    Raises ``UsageError`` for an assignment without ``=``, ``UnknownParamTypeError`` for
    ``TITLE:TYPE`` with a title of the workflow and a type no plugin provides (listing those
    installed), ``ParamError`` for a value its type refuses.
    """
    params: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (file_params or {}).items()}
    by_title: dict[str, str] = {}
    for name, entry in params.items():
        mappings = entry.get("node_mappings")
        for title in [mappings] if isinstance(mappings, str) else mappings or []:
            if isinstance(title, str):
                by_title.setdefault(title, name)
    types = set(known_types)
    for flag, text in assignments:
        key, raw = _split_assignment(flag, text)
        if key in params:
            name = key
        elif key in by_title:
            name = by_title[key]
        else:
            title, explicit = key, None
            head, colon, tail = key.rpartition(":")
            if colon and not node_ids_by_title(workflow, key):
                if tail in types:
                    title, explicit = head, tail
                elif node_ids_by_title(workflow, head):  # TITLE:TYPE with a type not installed
                    raise UnknownParamTypeError(head, tail, sorted(types))
            name = title
            params[name] = {
                "type": explicit or infer_param_type(workflow, title, raw),
                "node_mappings": title,
            }
            by_title[title] = name
        entry = params[name]
        entry["value"] = parse_value(name, str(entry.get("type")), raw)
        if flag == "--scale":
            entry["gpu_scale"] = True
    return params


def parse_model(text: str) -> ModelRef:
    """``--model checkpoints/juggernaut_xl.safetensors`` -> ``ModelRef("checkpoints", ...)``;
    raises ``UsageError`` without a folder."""
    folder, sep, name = text.partition("/")
    if not sep or not folder or not name:
        raise UsageError(
            f"--model expects FOLDER/NAME (e.g. checkpoints/juggernaut_xl.safetensors), "
            f"got {text!r}"
        )
    return ModelRef(type=folder, name=name)


def parse_lora(text: str) -> LoRARef:
    """``--lora NAME=URL[@STRENGTH]`` -> ``LoRARef``; raises ``UsageError``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UsageError(
            "--lora expects NAME=URL[@STRENGTH] (e.g. detail.safetensors="
            f"https://example.com/detail.safetensors@0.8), got {text!r}"
        )
    url, strength = rest, 1.0
    head, at, tail = rest.rpartition("@")
    if at:
        try:
            strength = float(tail)
            url = head
        except ValueError:
            pass  # an @ inside the URL (user@host), not a strength
    if not math.isfinite(strength):
        raise UsageError(f"--lora {name}: the strength must be a finite number, got {tail!r}")
    return LoRARef(name=name, url=url, strength=strength)


# ====================================================================== running a job


@dataclass(frozen=True)
class _Setup:
    """What ``ComfyAPI`` is made with."""

    targets: list[ComfyUIInstance | str]
    models_path: Path
    gpu: GPUInfo
    auto_start: bool = True
    ready_timeout: float = 120.0
    execution_timeout: float = 3600.0
    state_dir: Path | None = None
    download_dir: Path | None = None
    plugins: Plugins | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Job:
    """What ``run_workflow`` is called with."""

    workflow: dict[str, Any]
    params: dict[str, dict[str, Any]]
    models: list[ModelRef] = field(default_factory=list)
    loras: list[LoRARef] = field(default_factory=list)
    seed: int | None = None


async def _execute(setup: _Setup, job: _Job, display: Display | None) -> JobResult:
    """Start (or attach to) the instances, run the job, stop everything; the JobResult.

    Whatever happens (an error, Ctrl-C), leaving ``async with api`` stops every process we
    started before this returns or raises.
    """
    api = ComfyAPI(
        setup.targets,
        setup.models_path,
        gpu=setup.gpu,
        auto_start=setup.auto_start,
        ready_timeout=setup.ready_timeout,
        execution_timeout=setup.execution_timeout,
        state_dir=setup.state_dir,
        download_dir=setup.download_dir,
        plugins=setup.plugins,
        env=setup.env,
    )
    with unwrapped():
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_signals)
            progress = None
            if display is not None:
                progress = await nursery.start(
                    partial(follow_progress, api, display, workflow=job.workflow)
                )
            try:
                async with api:
                    if display is not None and progress is not None:
                        # Every instance is ready now: show it before a quick job ends.
                        progress.update(api.statistics(), trio.current_time())
                        display.show(progress)
                    return await api.run_workflow(
                        job.workflow,
                        params=job.params,
                        models=job.models,
                        loras=job.loras,
                        seed=job.seed,
                    )
            finally:
                nursery.cancel_scope.cancel()


class _Stopped(Exception):
    """SIGTERM or SIGHUP arrived: the job stops the way Ctrl-C stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _watch_signals(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Turn SIGTERM and SIGHUP into ``_Stopped``: without this the interpreter would die at
    once and the ComfyUI processes we started (each in its own session, so that a Ctrl-C in
    the terminal reaches only us) would outlive it."""
    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    with trio.open_signal_receiver(*wanted) as signals:
        task_status.started()
        async for signum in signals:
            raise _Stopped(signum)


def _interrupted(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return False


def _result_json(result: JobResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "job_id": result.job_id,
        "seed": result.seed,
        "seconds": round(result.finished_at - result.started_at, 3),
        "paths": result.paths,
        "outputs": [_output_json(o) for o in result.outputs],
        "shards": [
            {
                "index": s.index,
                "instance": s.instance,
                "prompt_id": s.prompt_id,
                "scaled": s.scaled,
                "seeds": s.seeds,
                "seconds": round(s.finished_at - s.submitted_at, 3),
                "ok": s.ok,
            }
            for s in result.shards
        ],
        "failures": [
            {
                "index": f.index,
                "instance": f.instance,
                "prompt_id": f.prompt_id,
                "error": type(f.error).__name__,
                "message": str(f.error),
                "node_id": f.node_id,
                "node_type": f.node_type,
                "exception_type": f.exception_type,
                "outputs": [_output_json(o) for o in f.outputs],
            }
            for f in result.failures
        ],
    }


def _output_json(o: OutputFile) -> dict[str, Any]:
    return {
        "path": o.path,
        "instance": o.instance,
        "prompt_id": o.prompt_id,
        "node_id": o.node_id,
        "filename": o.filename,
        "subfolder": o.subfolder,
        "type": o.type,
    }


def _error_json(exc: BaseException) -> dict[str, Any]:
    others = getattr(exc, "other_errors", None) or []
    return {
        "ok": False,
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "other_errors": [{"type": type(e).__name__, "message": str(e)} for e in others],
            "outputs": [
                _output_json(o)
                for e in (exc, *others)
                if isinstance(e, ExecutionError)
                for o in e.outputs
            ],
        },
    }


def _report_error(exc: BaseException, *, as_json: bool) -> None:
    """The error's message on stderr (the others of a failed job too); JSON on stdout."""
    _err(f"error: {exc}")
    for other in getattr(exc, "other_errors", None) or []:
        _err(f"error: {other}")
    if as_json:
        print(json.dumps(_error_json(exc), indent=2), flush=True)


def _make_display(args: argparse.Namespace) -> tuple[Display | None, Console | None]:
    """(display or None, the rich console it draws on or None)."""
    if getattr(args, "quiet", False):
        return None, None
    mode = getattr(args, "progress", "auto")
    live = mode == "live" or (mode == "auto" and sys.stderr.isatty())
    if live:
        console = Console(stderr=True, force_terminal=True if mode == "live" else None)
        return LiveDisplay(console), console
    if mode == "none":
        return None, None
    return LineDisplay(sys.stderr), None


def _run_trio(
    setup: _Setup, job: _Job, display: Display | None, *, as_json: bool
) -> tuple[int, JobResult | None]:
    """Run the job; (exit code, JobResult or None). Errors are reported here."""
    try:
        result = trio.run(_execute, setup, job, display)
    except ParamError as exc:
        _report_error(exc, as_json=as_json)
        return EXIT_USAGE, None
    except ComfyAPIError as exc:
        _report_error(exc, as_json=as_json)
        return EXIT_FAILED, None
    except _Stopped as exc:
        _err(f"stopped by {exc}: the job was cancelled and every ComfyUI we started was stopped")
        return 128 + exc.signum, None
    except BaseException as exc:
        stopped = exc.subgroup(_Stopped) if isinstance(exc, BaseExceptionGroup) else None
        if stopped is not None:  # the signal arrived while other tasks were also ending
            signum = single_error(stopped)
            _err(
                "stopped by a signal: the job was cancelled and every ComfyUI we started "
                "was stopped"
            )
            return 128 + (signum.signum if isinstance(signum, _Stopped) else signal.SIGTERM), None
        if _interrupted(exc):
            _err("interrupted: the job was cancelled and every ComfyUI we started was stopped")
            return EXIT_INTERRUPTED, None
        raise
    return EXIT_OK, result


# ====================================================================== run


def _add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("instances (at least one --comfyui or --url)")
    group.add_argument(
        "--comfyui",
        type=Path,
        metavar="PATH",
        help="a ComfyUI install (the folder with main.py): one instance per GPU is started",
    )
    group.add_argument(
        "--port", type=int, default=8188, help="first port of --comfyui (instances use P..P+N-1)"
    )
    group.add_argument(
        "--instances",
        type=int,
        metavar="N",
        help="how many --comfyui instances (default: one per GPU NVML sees, 1 without GPU)",
    )
    group.add_argument(
        "--python",
        metavar="PY",
        help="the interpreter of ComfyUI's environment (default: this one)",
    )
    group.add_argument("--cpu", action="store_true", help="run --comfyui instances with --cpu")
    group.add_argument(
        "--attach",
        action="store_true",
        help="attach to ComfyUI already running on the --comfyui ports instead of starting it",
    )
    group.add_argument(
        "--comfyui-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more ComfyUI flag for every started instance (repeat), "
        "e.g. --comfyui-arg=--lowvram",
    )
    group.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="URL",
        help="a running ComfyUI server, e.g. http://gpu-box:8188 (repeat for several)",
    )
    group.add_argument(
        "--ready-timeout",
        type=float,
        metavar="S",
        help="seconds to wait for every server to answer (default 120 when we start them, else 10)",
    )
    group.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where started instances keep their folders and logs (default PATH/comfytrio)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (not paths)"
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: milestones, -vv: details and ComfyUI's own output)",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", help="no progress or status lines on stderr"
    )
    progress = group.add_mutually_exclusive_group()
    progress.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const="lines",
        default="auto",
        help="plain status lines instead of the live display",
    )
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const="live",
        help="the live display even when stderr is not a terminal",
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "workflow", type=Path, help='an API-format workflow (exported with "Save (API)")'
    )
    params = parser.add_argument_group("params")
    params.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="TITLE=VALUE",
        help='set a node by title, e.g. --param "API - STEP=20" (type from the node); '
        "TITLE:TYPE=VALUE names the type; NAME=VALUE changes a --param-file entry",
    )
    params.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="TITLE=VALUE",
        help="like --param, split across the instances (gpu_scale), "
        'e.g. --scale "API - BATCH SIZE=8"',
    )
    params.add_argument(
        "--param-file",
        type=Path,
        metavar="FILE",
        help='params as JSON in the seed format: {"steps": {"type": "integer", "value": 20, '
        '"node_mappings": "API - STEP", "gpu_scale": false}}',
    )
    params.add_argument(
        "--seed", type=int, help="the job seed (reported in the result; give it again to repeat)"
    )
    assets = parser.add_argument_group("models and LoRAs")
    assets.add_argument(
        "--models-path",
        type=Path,
        metavar="DIR",
        help="models root (checkpoints/, loras/, ...; default PATH/models with --comfyui)",
    )
    assets.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FOLDER/NAME",
        help="a model that must exist, e.g. checkpoints/juggernaut_xl.safetensors (repeat)",
    )
    assets.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=URL[@STRENGTH]",
        help="a LoRA, downloaded into loras/ when missing (repeat)",
    )
    _add_instance_arguments(parser)
    job = parser.add_argument_group("job")
    job.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="seconds each shard may run, from when it starts running (default 3600); then "
        "it fails and is interrupted",
    )
    job.add_argument(
        "--download-dir",
        type=Path,
        metavar="DIR",
        help="where outputs of remote (--url) servers are downloaded (default ./comfytrio-outputs)",
    )
    _add_output_arguments(parser)


def _gpu_and_count(args: argparse.Namespace) -> tuple[GPUInfo, int]:
    """The GPUInfo for ComfyAPI and the number of --comfyui instances."""
    if args.instances is not None and args.instances < 1:
        raise UsageError(f"--instances must be at least 1, got {args.instances}")
    if args.cpu or args.attach:
        count = args.instances or 1
        return GPUInfo(cuda_available=False, device_count=count), count
    with _quiet_nvml():
        found = detect_gpus()
    if not found.cuda_available:
        count = args.instances or 1
        logging.getLogger("comfytrio.cli").warning(
            "NVML sees no CUDA GPU: %d instance(s) run with --cpu", count
        )
        return GPUInfo(cuda_available=False, device_count=count), count
    if args.instances is not None and args.instances > found.device_count:
        raise UsageError(
            f"--instances {args.instances} but NVML sees {found.device_count} GPU(s): use "
            f"--instances {found.device_count} or fewer, or --cpu"
        )
    return found, args.instances or found.device_count


def _setup_from(args: argparse.Namespace, plugins: Plugins) -> _Setup:
    targets: list[ComfyUIInstance | str] = []
    gpu = GPUInfo(cuda_available=False, device_count=0)
    models_path = args.models_path
    starting = False
    if args.comfyui is not None:
        path = args.comfyui.expanduser().resolve()
        if not (path / "main.py").is_file():
            raise UsageError(
                f"--comfyui {args.comfyui}: no main.py there (give the ComfyUI folder that "
                "holds main.py)"
            )
        gpu, count = _gpu_and_count(args)
        targets += [
            ComfyUIInstance(path, args.port + i, python=args.python, extra_args=args.comfyui_arg)
            for i in range(count)
        ]
        if models_path is None:
            models_path = path / "models"
        starting = not args.attach
    elif args.instances is not None or args.attach or args.cpu or args.python:
        raise UsageError("--instances, --python, --cpu and --attach need --comfyui PATH")
    for url in args.url:
        if not re.match(r"^https?://[^/]+", url):
            raise UsageError(f"--url expects http://HOST:PORT, got {url!r}")
        targets.append(url)
    if not targets:
        raise UsageError(
            "nothing to run on: give --comfyui PATH (a ComfyUI install to start) and/or "
            "--url URL (a running server)"
        )
    if models_path is not None and not models_path.is_dir() and starting:
        raise UsageError(f"--models-path {models_path}: no such folder")
    ready = args.ready_timeout
    if ready is None:
        ready = 120.0 if starting else 10.0
    if args.timeout <= 0 or ready <= 0:
        raise UsageError("--timeout and --ready-timeout must be positive")
    return _Setup(
        targets=targets,
        models_path=(models_path or Path.cwd() / "models"),
        gpu=gpu,
        auto_start=not args.attach,
        ready_timeout=ready,
        execution_timeout=args.timeout,
        state_dir=args.state_dir,
        download_dir=args.download_dir,
        plugins=plugins,
    )


def _run(args: argparse.Namespace) -> int:
    display, console = _make_display(args)
    _setup_logging(args.verbose, console)
    try:
        workflow = load_workflow(args.workflow)
        file_params = load_param_file(args.param_file) if args.param_file else None
        plugins = make_plugin_manager()
        assignments = [("--param", p) for p in args.param] + [("--scale", s) for s in args.scale]
        params = build_params(
            workflow,
            assignments,
            file_params=file_params,
            known_types=plugins.param_types(),
        )
        validate_params(plugins, workflow, params)  # before any server starts
        if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
            raise UsageError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
        job = _Job(
            workflow,
            params,
            [parse_model(m) for m in args.model],
            [parse_lora(lo) for lo in args.lora],
            args.seed,
        )
        setup = _setup_from(args, plugins)
    except UsageError as exc:
        _err(f"comfytrio run: error: {exc}")
        if args.json:
            print(json.dumps(_error_json(exc), indent=2), flush=True)
        return EXIT_USAGE
    except ParamError as exc:
        _report_error(exc, as_json=args.json)
        return EXIT_USAGE
    except ComfyAPIError as exc:  # GPUDetectionError, PluginError
        _report_error(exc, as_json=args.json)
        return EXIT_FAILED
    code, result = _run_trio(setup, job, display, as_json=args.json)
    if result is None:
        return code
    if args.json:
        print(json.dumps(_result_json(result), indent=2), flush=True)
    else:
        for path in result.paths:
            print(path, flush=True)
    for failure in result.failures:
        _err(f"error: shard {failure.index} on {failure.instance} failed: {failure.error}")
    if not args.quiet:
        seconds = result.finished_at - result.started_at
        _err(
            f"job {result.job_id}: {len(result.paths)} file(s) in {seconds:.2f} s, "
            f"seed {result.seed}"
            + (
                f", {len(result.failures)}/{len(result.shards)} shard(s) failed"
                if result.failures
                else ""
            )
        )
    return EXIT_OK if result.ok else EXIT_FAILED


# ====================================================================== demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("comfytrio-demo"),
        help="where the fake install, instances and images go (default: ./comfytrio-demo)",
    )
    parser.add_argument("--instances", type=int, default=2, help="fake servers (default 2)")
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="images in the batch, split across the servers (default 4)",
    )
    parser.add_argument(
        "--seconds-per-image",
        type=float,
        default=0.05,
        help="simulated GPU seconds per image (default 0.05)",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const="none",
        default="auto",
        help="no live display (it is only shown on a terminal anyway)",
    )


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _demo(args: argparse.Namespace) -> int:
    try:
        from ._demo import DEMO_WORKFLOW, demo_picture
        from .testing import lay_out_fake_comfyui_install

        picture = demo_picture()
    except ImportError as exc:  # the testing extra is missing
        _err(f"comfytrio demo needs the testing extra: pip install 'comfytrio[testing]' ({exc})")
        return EXIT_USAGE
    if args.instances < 1 or args.batch < 1:
        _err("comfytrio demo: error: --instances and --batch must be at least 1")
        return EXIT_USAGE
    display, console = _make_display(args)
    if console is None:
        display = None  # no status lines for the demo: its output is the report below
    _setup_logging(0, console)
    work = args.dir.resolve()
    install = lay_out_fake_comfyui_install(work / "ComfyUI")
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    setup = _Setup(
        targets=[ComfyUIInstance(install, port) for port in _free_ports(args.instances)],
        models_path=models,
        gpu=GPUInfo(cuda_available=False, device_count=args.instances),
        ready_timeout=60.0,
        state_dir=work / "instances",
        plugins=make_plugin_manager(),
        env={"COMFYTRIO_FAKE_SECONDS_PER_IMAGE": str(args.seconds_per_image)},
    )
    job = _Job(
        dict(DEMO_WORKFLOW),
        {
            "batch_size": {
                "type": "integer",
                "value": args.batch,
                "gpu_scale": True,
                "node_mappings": "API - BATCH SIZE",
            },
            "prompt": {"type": "string", "value": "demo", "node_mappings": "API - PROMPT"},
            "picture": {"type": "image", "value": picture, "node_mappings": "API - PICTURE"},
        },
    )
    print(f"Starting {args.instances} fake ComfyUI servers under {work} ...", flush=True)
    code, result = _run_trio(setup, job, display, as_json=False)
    if result is None:
        return code
    for shard in result.shards:
        print(f"shard {shard.index} on {shard.instance}: {shard.scaled} seeds={shard.seeds}")
    print(
        f"{len(result.outputs)} images (job {result.job_id}, "
        f"{result.finished_at - result.started_at:.2f} s):"
    )
    for output in result.outputs:
        print(f"  {output.path}")
    return EXIT_OK if result.ok else EXIT_FAILED


# ====================================================================== doctor


class _Report:
    """What doctor found: lines printed as they come, problems listed at the end."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def info(self, line: str) -> None:
        print(line, flush=True)

    def problem(self, line: str) -> None:
        print(f"  PROBLEM: {line}", flush=True)
        self.problems.append(line)


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--comfyui", type=Path, metavar="PATH", help="check a ComfyUI install (folder of main.py)"
    )
    parser.add_argument(
        "--python", metavar="PY", help="the interpreter that runs ComfyUI (default: this one)"
    )
    parser.add_argument(
        "--port", type=int, help="the port to check (and to --start on; default: a free one)"
    )
    parser.add_argument("--cpu", action="store_true", help="check (and start) without a GPU")
    parser.add_argument(
        "--start",
        action="store_true",
        help="start one instance of --comfyui and report what it answers, then stop it",
    )
    parser.add_argument("--models-path", type=Path, metavar="DIR", help="check a models root too")
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="URL",
        help="check a running ComfyUI server (repeat)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for a server (default 10; --start: 120)",
    )


def _gib(n: Any) -> str:
    try:
        return f"{int(n) / 2**30:.1f} GiB"
    except (TypeError, ValueError):
        return "?"


def _nvml_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def _quiet_nvml() -> Iterator[None]:
    """Hide pynvml's own deprecation notice (it asks for nvidia-ml-py, same module)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
        yield


def _check_nvml(report: _Report) -> int:
    """What NVML sees; the number of GPUs (0 without NVML)."""
    try:
        with _quiet_nvml():
            nvml = _gpu._load_nvml()
        nvml.nvmlInit()
    except Exception as exc:
        report.info(f"NVML: not available ({exc}): local instances run with --cpu")
        return 0
    try:
        try:
            driver = _nvml_text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = "?"
        count = int(nvml.nvmlDeviceGetCount())
        report.info(f"NVML: driver {driver}, {count} GPU(s)")
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _nvml_text(nvml.nvmlDeviceGetName(handle))
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                sizes = f", {_gib(memory.total)} ({_gib(memory.free)} free)"
            except Exception:
                sizes = ""
            report.info(f"  GPU {index}: {name}{sizes}")
        if count == 0:
            report.info("  no GPU: local instances run with --cpu")
        return count
    except Exception as exc:
        report.problem(
            f"NVML started but cannot list the GPUs ({exc}): check the NVIDIA driver "
            "(nvidia-smi), or run with --cpu"
        )
        return 0
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _model_folders(root: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found[folder.name] = sum(
            1 for f in folder.rglob("*") if f.is_file() and not f.name.startswith(("put_", "."))
        )
    return found


def _describe_models(counts: Mapping[str, int]) -> str:
    filled = [f"{name} {n}" for name, n in counts.items() if n]
    empty = len(counts) - len(filled)
    text = ", ".join(filled) if filled else "no model files"
    return f"{text} ({len(counts)} folder(s), {empty} empty)"


def _port_answer(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _python_check(
    report: _Report, python: str, install: Path, *, fake: bool, gpus: int, cpu: bool
) -> bool:
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    try:
        done = await trio.run_process(
            [python, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
    except OSError as exc:
        report.problem(
            f"cannot run {python} ({exc.strerror or exc}): give ComfyUI's interpreter with --python"
        )
        return False
    if done.returncode != 0:
        report.problem(f"{python} exits with code {done.returncode}: give a working --python")
        return False
    report.info(f"  python {python}: {done.stdout.decode().strip()}")
    if fake:
        report.info("  (a comfytrio fake install: no torch needed)")
        return True
    torch = (
        "import torch; print(torch.__version__, torch.cuda.is_available(), "
        "torch.cuda.device_count())"
    )
    with trio.move_on_after(180):
        done = await trio.run_process(
            [python, "-c", torch], capture_stdout=True, capture_stderr=True, check=False
        )
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        report.problem(
            f"{python} cannot import torch ({last}): install ComfyUI's requirements into it "
            f"({python} -m pip install -r {install / 'requirements.txt'}) or point --python at "
            "ComfyUI's environment"
        )
        return False
    version, cuda, devices = [*done.stdout.decode().split(), "?", "?", "?"][:3]
    report.info(f"  torch {version}, CUDA {'yes' if cuda == 'True' else 'no'}, {devices} device(s)")
    if gpus and not cpu and cuda != "True":
        report.problem(
            f"NVML sees {gpus} GPU(s) but torch in {python} cannot use CUDA: install a CUDA "
            "build of torch, or run with --cpu"
        )
    return True


async def _check_install(report: _Report, args: argparse.Namespace, gpus: int) -> bool:
    path: Path = args.comfyui.expanduser().resolve()
    report.info(f"ComfyUI install {path}:")
    main_py = path / "main.py"
    if not main_py.is_file():
        report.problem(
            f"no main.py in {path}: --comfyui must be the ComfyUI folder that holds main.py "
            "(git clone https://github.com/comfyanonymous/ComfyUI)"
        )
        return False
    fake = "comfytrio" in main_py.read_text(errors="replace")
    version_file = path / "comfyui_version.py"
    version = "unknown"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
        version = match.group(1) if match else version
    report.info(f"  main.py found, version {version}" + (" (comfytrio fake)" if fake else ""))
    ok = await _python_check(
        report, args.python or sys.executable, path, fake=fake, gpus=gpus, cpu=args.cpu
    )
    if (path / "models").is_dir():
        report.info(f"  models/: {_describe_models(_model_folders(path / 'models'))}")
    else:
        report.info("  no models/ folder in the install")
    if args.port is not None:
        if _port_answer(args.port):
            report.problem(
                f"port {args.port} on 127.0.0.1 is in use: pick another --port (or attach to "
                "that server with --attach)"
            )
            ok = False
        else:
            report.info(f"  port {args.port} is free")
    return ok


async def _describe_server(
    report: _Report, http: httpx.AsyncClient, stats: Mapping[str, Any]
) -> None:
    system = stats.get("system") or {}
    python = str(system.get("python_version", "?")).split()[0]
    report.info(
        f"  ComfyUI {system.get('comfyui_version', '?')}, Python {python}, "
        f"PyTorch {system.get('pytorch_version', '?')}"
    )
    for device in stats.get("devices") or []:
        report.info(
            f"  device {device.get('name', '?')} ({device.get('type', '?')}): "
            f"{_gib(device.get('vram_total'))} ({_gib(device.get('vram_free'))} free)"
        )
    r = await http.get("/object_info")
    if r.status_code == 200:
        report.info(f"  object_info: {len(r.json())} node classes")
    else:
        report.problem(f"GET /object_info answered HTTP {r.status_code}")
    r = await http.get("/models")
    if r.status_code != 200:
        report.info("  /models: not available")
        return
    counts: dict[str, int] = {}
    for folder in r.json():
        listing = await http.get(f"/models/{folder}")
        counts[str(folder)] = len(listing.json()) if listing.status_code == 200 else 0
    report.info(f"  models: {_describe_models(counts)}")


async def _check_url(report: _Report, url: str, timeout: float) -> None:
    report.info(f"ComfyUI server {url}:")
    try:
        async with httpx.AsyncClient(
            base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout)
        ) as http:
            try:
                r = await http.get("/system_stats")
            except httpx.TransportError as exc:
                report.problem(
                    f"{url} does not answer ({type(exc).__name__}: {exc}): is ComfyUI running "
                    "there? check the host and port, and that it listens beyond 127.0.0.1 "
                    "(--listen)"
                )
                return
            if r.status_code != 200:
                report.problem(
                    f"{url}/system_stats answered HTTP {r.status_code}: is it a ComfyUI server?"
                )
                return
            await _describe_server(report, http, r.json())
    except (httpx.HTTPError, ValueError) as exc:
        report.problem(f"{url} answered something unexpected ({exc}): is it a ComfyUI server?")


async def _start_check(report: _Report, args: argparse.Namespace, gpus: int) -> None:
    path = args.comfyui.expanduser().resolve()
    port = args.port or _free_ports(1)[0]
    cuda = bool(gpus) and not args.cpu
    models = args.models_path or path / "models"
    report.info(f"starting one instance on port {port} ({'GPU 0' if cuda else '--cpu'}) ...")
    with tempfile.TemporaryDirectory(prefix="comfytrio-doctor-") as state:
        api = ComfyAPI(
            [ComfyUIInstance(path, port, python=args.python)],
            models,
            gpu=GPUInfo(cuda_available=cuda, device_count=1),
            state_dir=state,
            ready_timeout=max(args.timeout, 120.0),
            grace=5.0,
        )
        try:
            async with api:
                instance = api.instances[0]
                process = instance.process
                started = f" in {process.ready_at - process.spawned_at:.1f} s" if process else ""
                report.info(f"  ready at {instance.url}{started}")
                async with httpx.AsyncClient(base_url=instance.url, timeout=30) as http:
                    stats = (await http.get("/system_stats")).json()
                    await _describe_server(report, http, stats)
        except ComfyAPIError as exc:
            text = str(exc)
            first, _, rest = text.partition("\n")
            if rest:
                report.info(rest)
            report.problem(f"{first}: fix what its log says (or check --python, --port, --cpu)")


async def _doctor_async(args: argparse.Namespace) -> list[str]:
    report = _Report()
    report.info(
        f"comfytrio {__version__}, Python {platform.python_version()} ({sys.executable}), "
        f"{platform.system()} {platform.machine()}"
    )
    try:
        plugins = make_plugin_manager()
        report.info(
            f"plugins: {', '.join(plugins.names()) or 'none'}; param types: "
            f"{', '.join(sorted(plugins.param_types()))}"
        )
    except PluginError as exc:
        report.problem(
            f"{exc}: uninstall or fix that plugin, or block it with COMFYTRIO_BLOCK_PLUGINS"
        )
    gpus = _check_nvml(report)
    if args.comfyui is not None:
        ok = await _check_install(report, args, gpus)
        if args.start and ok:
            await _start_check(report, args, gpus)
    elif args.start:
        report.problem("--start needs --comfyui PATH")
    if args.models_path is not None:
        if args.models_path.is_dir():
            counts = _model_folders(args.models_path)
            report.info(f"models path {args.models_path}: {_describe_models(counts)}")
        else:
            report.problem(
                f"--models-path {args.models_path} is not a folder: create it or fix the path"
            )
    for url in args.url:
        await _check_url(report, url, args.timeout)
    return report.problems


def _doctor(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    problems = trio.run(_doctor_async, args)
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print(f"- {problem}")
        return EXIT_FAILED
    print("\nno problems found")
    return EXIT_OK


# ====================================================================== fake-server


def _fake_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        required=True,
        type=Path,
        help="base directory (input/, output/, temp/, models/<type>/ are created if missing)",
    )
    parser.add_argument("--port", type=int, default=8188, help="port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--seconds-per-image",
        type=float,
        default=0.0,
        help="simulated GPU seconds per image produced",
    )
    parser.add_argument(
        "--seconds-per-step",
        type=float,
        default=0.0,
        help="simulated seconds per sampler step and latent",
    )
    parser.add_argument(
        "--startup-delay", type=float, default=0.0, help="seconds before it starts listening"
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive_seconds,
        default=75.0,
        metavar="SECONDS",
        help="seconds an idle keep-alive connection is kept before the server closes it "
        "(default 75, as ComfyUI)",
    )


def _positive_seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _fake_server(args: argparse.Namespace) -> int:
    try:
        from .testing._engine import Settings
        from .testing._fake import FakeComfyUI
        from .testing._main import serve_until_signal
        from .testing._paths import FakePaths
        from .testing._server import SystemInfo
    except ImportError as exc:  # the testing extra is missing
        print(
            f"comfytrio fake-server needs the testing extra: pip install "
            f"'comfytrio[testing]' ({exc})",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()
    fake = FakeComfyUI(
        FakePaths.under(root),
        host=args.host,
        port=args.port,
        settings=Settings(
            seconds_per_image=args.seconds_per_image, seconds_per_step=args.seconds_per_step
        ),
        system=SystemInfo(
            argv=["main.py", "--cpu", "--listen", args.host, "--port", str(args.port)]
        ),
        startup_delay=args.startup_delay,
        idle_timeout=args.idle_timeout,
    )

    def ready(fake: FakeComfyUI) -> None:
        print(f"Fake ComfyUI serving {fake.url} (root: {root}); Ctrl-C to stop", flush=True)
        print(f"To see the GUI go to: {fake.url}", flush=True)

    try:
        trio.run(serve_until_signal, fake, ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(
            f"comfytrio fake-server: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    print("Stopped", flush=True)
    return 0


# ====================================================================== plugins


def _plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def _plugins(args: argparse.Namespace) -> int:
    """List every installed param type and asset resolver, one line each."""
    try:
        entries = make_plugin_manager().describe()
    except PluginError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps([attrs.asdict(e) for e in entries], indent=2), flush=True)
        return EXIT_OK
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        print(f"{e.kind:<14}  {e.name:<{width}}  {e.plugin} ({e.distribution})  {e.summary}")
    return EXIT_OK


# ====================================================================== the parser


COMMANDS: list[_Command] = [
    _Command(
        "run",
        "run a workflow on ComfyUI instances (started here, or --url) and print the outputs",
        _run_arguments,
        _run,
    ),
    _Command(
        "demo",
        "run a split batch on bundled fake ComfyUI servers and print where the images went",
        _demo_arguments,
        _demo,
    ),
    _Command(
        "doctor",
        "check NVML, a ComfyUI install (--comfyui) and servers (--url); say what to fix",
        _doctor_arguments,
        _doctor,
    ),
    _Command(
        "plugins",
        "list the installed param types and asset resolvers, one line each",
        _plugins_arguments,
        _plugins,
    ),
    _Command(
        "fake-server",
        "serve a fake ComfyUI (for tests and demos) until Ctrl-C",
        _fake_server_arguments,
        _fake_server,
    ),
]
"""The sub-commands, in help order."""


class _Parser(argparse.ArgumentParser):
    """argparse, with our exit code for usage errors kept at 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``comfytrio`` argument parser with every registered sub-command."""
    parser = _Parser(prog="comfytrio", description="Run ComfyUI workflows on many ComfyUI servers.")
    parser.add_argument("--version", action="version", version=f"comfytrio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``comfytrio`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our stdout went away (| head): not worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return code

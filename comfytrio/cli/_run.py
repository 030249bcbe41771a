"""``comfytrio run``: its arguments, the instances and the job they describe, the run, and
what it prints (paths or ``--json`` on stdout; progress and errors on stderr)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .. import (
    ComfyAPIError,
    ComfyUIInstance,
    GPUInfo,
    ParamError,
    Plugins,
    WorkflowOptions,
    make_plugin_manager,
    validate_params,
)
from .._gpu import detect_gpus
from .._plan import MAX_SEED
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_flag,
    add_number,
    add_path,
    add_repeated,
    err,
    logger,
    quiet_nvml,
    setup_logging,
)
from ._dry_run import dry_run
from ._job import Job, Setup, make_display, run_job
from ._output import error_json, report_error, result_json
from ._params import build_params, load_param_file, load_workflow, parse_lora, parse_model

__all__ = ["add_output_arguments", "add_run_arguments", "run"]


def _add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("instances (at least one --comfyui or --url)")
    add_path(
        group,
        "--comfyui",
        "PATH",
        "a ComfyUI install (the folder with main.py): one instance per GPU is started",
    )
    add_number(group, "--port", int, 8188, "first port of --comfyui (instances use P..P+N-1)")
    add_number(
        group,
        "--instances",
        int,
        None,
        "how many --comfyui instances (default: one per GPU NVML sees, 1 without GPU)",
        metavar="N",
    )
    group.add_argument(
        "--python",
        metavar="PY",
        help="the interpreter of ComfyUI's environment (default: this one)",
    )
    add_flag(group, "--cpu", "run --comfyui instances with --cpu")
    add_flag(
        group,
        "--attach",
        "attach to ComfyUI already running on the --comfyui ports instead of starting it",
    )
    add_repeated(
        group,
        "--comfyui-arg",
        "ARG",
        "one more ComfyUI flag for every started instance (repeat), e.g. --comfyui-arg=--lowvram",
    )
    add_repeated(
        group,
        "--url",
        "URL",
        "a running ComfyUI server, e.g. http://gpu-box:8188 (repeat for several)",
    )
    add_number(
        group,
        "--ready-timeout",
        float,
        None,
        "seconds to wait for every server to answer (default 120 when we start them, else 10)",
        metavar="S",
    )
    add_path(
        group,
        "--state-dir",
        "DIR",
        "where started instances keep their folders and logs (default PATH/comfytrio)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``-v``, ``-q``, ``--progress``/``--no-progress``."""
    group = parser.add_argument_group("output")
    add_flag(group, "--json", "print the result as JSON on stdout (not paths)")
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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of ``comfytrio run``."""
    parser.add_argument(
        "workflow", type=Path, help='an API-format workflow (exported with "Save (API)")'
    )
    params = parser.add_argument_group("params")
    add_repeated(
        params,
        "--param",
        "TITLE=VALUE",
        'set a node by title, e.g. --param "API - STEP=20" (type from the node); '
        "TITLE:TYPE=VALUE names the type; NAME=VALUE changes a --param-file entry",
    )
    add_repeated(
        params,
        "--scale",
        "TITLE=VALUE",
        'like --param, split across the instances (gpu_scale), e.g. --scale "API - BATCH SIZE=8"',
    )
    add_path(
        params,
        "--param-file",
        "FILE",
        'params as JSON in the seed format: {"steps": {"type": "integer", "value": 20, '
        '"node_mappings": "API - STEP", "gpu_scale": false}}',
    )
    add_number(
        params,
        "--seed",
        int,
        None,
        "the job seed (reported in the result; give it again to repeat)",
    )
    add_flag(
        params,
        "--same-images",
        "the split must make the images of one GPU, index for index: refuse (before "
        "anything runs) ancestral/SDE/LCM samplers, batches over 64, and splits of anything "
        "but an EmptyLatentImage batch",
    )
    assets = parser.add_argument_group("models and LoRAs")
    add_path(
        assets,
        "--models-path",
        "DIR",
        "models root (checkpoints/, loras/, ...; default PATH/models with --comfyui)",
    )
    add_repeated(
        assets,
        "--model",
        "FOLDER/NAME",
        "a model that must exist, e.g. checkpoints/juggernaut_xl.safetensors (repeat)",
    )
    add_repeated(
        assets,
        "--lora",
        "NAME=URL[@STRENGTH]",
        "a LoRA, downloaded into loras/ when missing (repeat)",
    )
    _add_instance_arguments(parser)
    job = parser.add_argument_group("job")
    add_number(
        job,
        "--timeout",
        float,
        3600.0,
        "seconds each shard may run, from when it starts running (default 3600); then "
        "it fails and is interrupted",
        metavar="S",
    )
    add_path(
        job,
        "--download-dir",
        "DIR",
        "where outputs of remote (--url) servers are downloaded (default ./comfytrio-outputs)",
    )
    add_flag(
        job,
        "--dry-run",
        "check the job on every server (node classes, inputs, values, model names, params) "
        "and print the planned shards and every problem; send no prompt (exit 1 on a problem)",
    )
    add_output_arguments(parser)


def _gpu_and_count(args: argparse.Namespace) -> tuple[GPUInfo, int]:
    """The GPUInfo for ComfyAPI and the number of --comfyui instances."""
    if args.instances is not None and args.instances < 1:
        raise UsageError(f"--instances must be at least 1, got {args.instances}")
    if args.cpu or args.attach:
        count = args.instances or 1
        return GPUInfo(cuda_available=False, device_count=count), count
    with quiet_nvml():
        found = detect_gpus()
    if not found.cuda_available:
        count = args.instances or 1
        logger.warning("NVML sees no CUDA GPU: %d instance(s) run with --cpu", count)
        return GPUInfo(cuda_available=False, device_count=count), count
    if args.instances is not None and args.instances > found.device_count:
        raise UsageError(
            f"--instances {args.instances} but NVML sees {found.device_count} GPU(s): use "
            f"--instances {found.device_count} or fewer, or --cpu"
        )
    return found, args.instances or found.device_count


def _setup_from(args: argparse.Namespace, plugins: Plugins) -> Setup:
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
    return Setup(
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


def _job_from(args: argparse.Namespace) -> tuple[Job, Plugins]:
    """The job (workflow, params, models, LoRAs, seed) and the plugins that checked its
    params, before any server starts."""
    workflow = load_workflow(args.workflow)
    file_params = load_param_file(args.param_file) if args.param_file else None
    plugins = make_plugin_manager()
    assignments = [("--param", p) for p in args.param] + [("--scale", s) for s in args.scale]
    params = build_params(workflow, assignments, plugins=plugins, file_params=file_params)
    if not args.dry_run:  # a dry run reports every bad param, with the server's problems
        validate_params(plugins, workflow, params)
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    models = [parse_model(m) for m in args.model]
    loras = [parse_lora(lo) for lo in args.lora]
    options = WorkflowOptions(
        params=params, models=models, loras=loras, seed=args.seed, same_images=args.same_images
    )
    return Job(workflow, options), plugins


def run(args: argparse.Namespace) -> int:
    """``comfytrio run``: check everything, run the job, print its outputs."""
    display, console = make_display(args)
    setup_logging(args.verbose, console)
    try:
        job, plugins = _job_from(args)
        setup = _setup_from(args, plugins)
    except UsageError as exc:
        err(f"comfytrio run: error: {exc}")
        if args.json:
            print(json.dumps(error_json(exc), indent=2), flush=True)
        return EXIT_USAGE
    except ParamError as exc:
        report_error(exc, as_json=args.json)
        return EXIT_USAGE
    except ComfyAPIError as exc:  # GPUDetectionError, PluginError
        report_error(exc, as_json=args.json)
        return EXIT_FAILED
    if args.dry_run:
        return dry_run(setup, job, as_json=args.json)
    code, result = run_job(setup, job, display, as_json=args.json)
    if result is None:
        return code
    if args.json:
        print(json.dumps(result_json(result), indent=2), flush=True)
    else:
        for path in result.paths:
            print(path, flush=True)
    for failure in result.failures:
        err(f"error: shard {failure.index} on {failure.instance} failed: {failure.error}")
    if not args.quiet:
        seconds = result.finished_at - result.started_at
        err(
            f"job {result.job_id}: {len(result.paths)} file(s) in {seconds:.2f} s, "
            f"seed {result.seed}, split {result.split}"
            + (
                f", {len(result.failures)}/{len(result.shards)} shard(s) failed"
                if result.failures
                else ""
            )
        )
    return EXIT_OK if result.ok else EXIT_FAILED

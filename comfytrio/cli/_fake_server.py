"""``comfytrio fake-server``: its flags, and a hand-over to ``comfytrio.testing``'s
``run_fake_server``, which owns the fake (it needs the ``testing`` extra)."""

from __future__ import annotations

import argparse
import logging

from ._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_number, add_path, err

__all__ = ["add_fake_server_arguments", "fake_server", "positive_seconds"]

_SERVE_OPTIONS = (
    "host",
    "port",
    "seconds_per_image",
    "seconds_per_step",
    "startup_delay",
    "idle_timeout",
    "previews",
    "comfyui_version",
)
"""The flags that go as they are to ``run_fake_server`` (``serve_fake_comfyui``)."""


def positive_seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def add_fake_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Every argument of ``comfytrio fake-server``."""
    add_path(
        parser,
        "--root",
        "ROOT",
        "base directory (input/, output/, temp/, models/<type>/ are created if missing)",
        required=True,
    )
    add_number(parser, "--port", int, 8188, "port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    add_number(
        parser, "--seconds-per-image", float, 0.0, "simulated GPU seconds per image produced"
    )
    add_number(
        parser, "--seconds-per-step", float, 0.0, "simulated seconds per sampler step and latent"
    )
    add_number(parser, "--startup-delay", float, 0.0, "seconds before it starts listening")
    add_number(
        parser,
        "--idle-timeout",
        positive_seconds,
        75.0,
        "seconds an idle keep-alive connection is kept before the server closes it "
        "(default 75, as ComfyUI)",
        metavar="SECONDS",
    )
    parser.add_argument(
        "--comfyui-version",
        default="0.3.64",
        metavar="VERSION",
        help="the ComfyUI version it speaks as: 0.3.64 (the recorded one, default) or 0.38.1 "
        "(adds /api/jobs, job cancel, the canonical prompt_id check)",
    )
    parser.add_argument(
        "--previews",
        action="store_true",
        help="samplers send a latent preview per step (as ComfyUI with --preview-method)",
    )


def fake_server(args: argparse.Namespace) -> int:
    """``comfytrio fake-server``: serve until Ctrl-C or SIGTERM."""
    try:
        from ..testing import COMFYUI_VERSIONS, run_fake_server
    except ImportError as exc:  # the testing extra is missing
        err(
            "comfytrio fake-server needs the testing extra: pip install "
            f"'comfytrio[testing]' ({exc})"
        )
        return EXIT_USAGE
    if args.comfyui_version not in COMFYUI_VERSIONS:
        known = ", ".join(COMFYUI_VERSIONS)
        err(f"comfytrio fake-server: --comfyui-version must be one of {known}")
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = args.root.resolve()

    def ready(url: str) -> None:
        print(f"Fake ComfyUI serving {url} (root: {root}); Ctrl-C to stop", flush=True)
        print(f"To see the GUI go to: {url}", flush=True)

    options = {name: getattr(args, name) for name in _SERVE_OPTIONS}
    try:
        run_fake_server(root, on_ready=ready, **options)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        err(f"comfytrio fake-server: cannot listen on {args.host}:{args.port}: {exc}")
        return EXIT_FAILED
    print("Stopped", flush=True)
    return EXIT_OK

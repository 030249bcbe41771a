"""The public names: the seed library's API stays, private modules stay private."""

from __future__ import annotations

import comfytrio

SEED_NAMES = {
    "ComfyAPI",
    "ComfyAPIError",
    "ComfyUIInstance",
    "ComfyUIStartupError",
    "ComfyUITimeoutError",
    "DownloadError",
    "GPUDetectionError",
    "GPUInfo",
    "LoRARef",
    "ModelNotFoundError",
    "ModelRef",
    "WorkflowError",
    "distribute",
}

FRONT_END_NAMES = {
    # What a front end (``serve``, the broker) needs of the core: events, ids, reattach, and
    # the error a box that cannot run a job raises.
    "JobEvent",
    "JobPlanned",
    "NoInstanceReadyError",
    "PROMPT_NAMESPACE",
    "ShardFailed",
    "ShardFinished",
    "ShardOutputs",
    "ShardSubmitted",
    "shard_prompt_id",
}


def test_seed_names_are_exported() -> None:
    missing = SEED_NAMES - set(dir(comfytrio))
    assert not missing


def test_front_end_names_are_exported() -> None:
    missing = FRONT_END_NAMES - set(dir(comfytrio))
    assert not missing


def test_public_names_have_docstrings_and_public_module() -> None:
    for name in dir(comfytrio):
        if name.startswith("_"):
            continue
        obj = getattr(comfytrio, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__doc__, f"{name} has no docstring"
            assert obj.__module__.startswith(("comfytrio", "pluggy")), (name, obj.__module__)


def test_the_scheduler_internals_stay_private() -> None:
    assert not hasattr(comfytrio, "ShardTask")  # the scheduler's shard record, typed inside


def test_every_error_derives_from_the_base() -> None:
    for name in dir(comfytrio):
        obj = getattr(comfytrio, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, comfytrio.ComfyAPIError), name


def test_errors_docstring_draws_every_error() -> None:
    from comfytrio import _errors

    tree = _errors.__doc__ or ""
    for name in _errors.__all__:
        assert name in tree, f"{name} missing from the tree in comfytrio/_errors.py"


def test_errors_of_one_server_share_a_base_that_says_whether_to_retry() -> None:
    retryable = {
        comfytrio.ServerLostError,
        comfytrio.ServerProtocolError,
        comfytrio.PromptVanishedError,
    }
    final = {
        comfytrio.ComfyUIStartupError,
        comfytrio.PortInUseError,
        comfytrio.ComfyUITimeoutError,
        comfytrio.WorkflowError,
        comfytrio.ExecutionError,
        comfytrio.ExecutionInterruptedError,
    }
    for cls in retryable | final:
        assert issubclass(cls, comfytrio.ServerError), cls
        assert cls.retryable is (cls in retryable), cls
    lost = comfytrio.ServerLostError("gpu-1:8188", "gone", prompt_id="p")
    assert (lost.instance, lost.prompt_id, lost.retryable) == ("gpu-1:8188", "p", True)
    assert not issubclass(comfytrio.ParamError, comfytrio.ServerError)

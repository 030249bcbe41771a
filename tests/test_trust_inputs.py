"""Caller input of any type gets a typed error naming the culprit, never a crash.

``validate_params`` and ``workflow_snapshot`` are what the api runs when a job is called;
the LoRA checks run when it is planned. A property test feeds them arbitrary JSON-ish values.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
from test_plugins_support import load_workflow, plan, std_plugins

import comfytrio
from comfytrio import (
    ComfyAPIError,
    DownloadError,
    LoRARef,
    NodeTitleNotFoundError,
    ParamError,
    PluginError,
    UnknownParamTypeError,
    UnsafeNameError,
    hookimpl,
    validate_params,
)
from comfytrio._plan import workflow_snapshot
from comfytrio.hookspecs import BaseParamType, Param


@cache
def plugins() -> comfytrio.Plugins:
    """One std manager for every example (validation does no I/O and keeps no state)."""
    return std_plugins()


def workflow() -> dict[str, Any]:
    return load_workflow("sdxl_txt2img")


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def cyclic() -> dict[str, Any]:
    wf = workflow()
    wf["20"]["inputs"]["self"] = wf["20"]
    return wf


def with_input(value: Any) -> dict[str, Any]:
    wf = workflow()
    wf["20"]["inputs"]["value"] = value
    return wf


def one(type_name: str, value: Any, title: Any = "API - STEP", **more: Any) -> dict[str, Any]:
    return {"c": {"type": type_name, "value": value, "node_mappings": title, **more}}


HUGE = 10**5000  # more digits than repr() may show

# (workflow, params, error class, the param it names, a piece of the message)
CASES: list[tuple[Any, Any, type[ComfyAPIError], str, str]] = [
    # the workflow itself
    ([], {}, ParamError, "workflow", "must be a dict of nodes"),
    (None, {}, ParamError, "workflow", "got NoneType"),
    ("{}", {}, ParamError, "workflow", "got str"),
    (42, {}, ParamError, "workflow", "got int"),
    ({"1": [1, 2]}, {}, ParamError, "workflow", "node '1' must be a dict"),
    ({"1": None}, {}, ParamError, "workflow", "node '1' must be a dict"),
    ({None: {}}, {}, ParamError, "workflow", "node id None"),
    ({(1, 2): {}}, {}, ParamError, "workflow", "node id (1, 2)"),
    ({True: {}}, {}, ParamError, "workflow", "node id True"),
    ({1: {}, "1": {}}, {}, ParamError, "workflow", "are one in JSON"),
    (with_input(math.nan), {}, ParamError, "workflow", "node '20' ('API - PROMPT') is not JSON"),
    (with_input(-math.inf), {}, ParamError, "workflow", "node '20'"),
    (with_input("a\udcffb"), {}, ParamError, "workflow", "node '20'"),
    (with_input(HUGE), {}, ParamError, "workflow", "node '20'"),
    (with_input(object()), {}, ParamError, "workflow", "node '20'"),
    (with_input(nested(100_000)), {}, ParamError, "workflow", "nested too deep"),
    (cyclic(), {}, ParamError, "workflow", "node '20'"),
    # the params dict and its entries
    (workflow(), [], ParamError, "params", "must be a dict of dicts"),
    (workflow(), {"c": None}, ParamError, "c", "must be a dict"),
    (workflow(), {"c": ["integer", 3]}, ParamError, "c", "must be a dict"),
    (workflow(), {5: {}}, ParamError, "5", "param names must be strings"),
    (workflow(), {HUGE: {}}, ParamError, "<an int of 16610 bits>", "must be strings"),
    (workflow(), {"c": {"type": None}}, ParamError, "c", "needs a 'type'"),
    (workflow(), one("nope", 1), UnknownParamTypeError, "c", "unknown type 'nope'"),
    (workflow(), one("integer", 1, None), ParamError, "c", "needs 'node_mappings'"),
    (workflow(), one("integer", 1, 7), ParamError, "c", "needs 'node_mappings'"),
    (workflow(), one("integer", 1, []), ParamError, "c", "needs 'node_mappings'"),
    (workflow(), one("integer", 1, ["API - STEP", None]), ParamError, "c", "node_mappings"),
    (workflow(), one("integer", 1, b"API"), ParamError, "c", "node_mappings"),
    (workflow(), one("integer", 1, "nope\x00"), NodeTitleNotFoundError, "c", "no node titled"),
    (workflow(), one("integer", 1, gpu_scale="yes"), ParamError, "c", "'gpu_scale'"),
    (workflow(), one("integer", 1, gpu_scale=HUGE), ParamError, "c", "<an int of"),
    # integer
    (workflow(), one("integer", None), ParamError, "c", "needs a 'value'"),
    (workflow(), one("integer", True), ParamError, "c", "expects an integer, got bool"),
    (workflow(), one("integer", 1.5), ParamError, "c", "expects an integer"),
    (workflow(), one("integer", "3"), ParamError, "c", "expects an integer"),
    (workflow(), one("integer", [3]), ParamError, "c", "expects an integer"),
    (workflow(), one("integer", 2**64), ParamError, "c", "must be from"),
    (workflow(), one("integer", -(2**63) - 1), ParamError, "c", "must be from"),
    (workflow(), one("integer", 10**400), ParamError, "c", "must be from"),
    (workflow(), one("integer", HUGE), ParamError, "c", "<an int of 16610 bits>"),
    # float
    (workflow(), one("float", 10**400), ParamError, "c", "expects a finite number"),
    (workflow(), one("float", HUGE), ParamError, "c", "expects a finite number"),
    (workflow(), one("float", math.nan), ParamError, "c", "expects a finite number, got nan"),
    (workflow(), one("float", math.inf), ParamError, "c", "expects a finite number"),
    (workflow(), one("float", False), ParamError, "c", "expects a number, got bool"),
    (workflow(), one("float", "1.5"), ParamError, "c", "expects a number"),
    # string
    (workflow(), one("string", 5, "API - PROMPT"), ParamError, "c", "expects a string"),
    (workflow(), one("string", "a\x00b", "API - PROMPT"), ParamError, "c", "NUL"),
    (workflow(), one("string", "a\ud800", "API - PROMPT"), ParamError, "c", "not valid Unicode"),
    (workflow(), one("string", {"a": 1}, "API - PROMPT"), ParamError, "c", "expects a string"),
    # boolean
    (workflow(), one("boolean", 1), ParamError, "c", "expects true or false"),
    (workflow(), one("boolean", "true"), ParamError, "c", "expects true or false"),
    # seed
    (workflow(), one("seed", -1, "K - SEED"), ParamError, "c", "a seed must be from"),
    (workflow(), one("seed", HUGE, "K - SEED"), ParamError, "c", "<an int of"),
    (workflow(), one("seed", True, "K - SEED"), ParamError, "c", "expects an integer seed"),
    # image
    (workflow(), one("image", [], "API - PROMPT"), ParamError, "c", "expects an http(s) URL"),
    (workflow(), one("image", {}, "API - PROMPT"), ParamError, "c", "expects an http(s) URL"),
    (workflow(), one("image", 5, "API - PROMPT"), ParamError, "c", "expects an http(s) URL"),
    (workflow(), one("image", b"", "API - PROMPT"), ParamError, "c", "empty"),
    (workflow(), one("image", "a\x00.png", "API - PROMPT"), ParamError, "c", "NUL"),
    (workflow(), one("image", "http://[::1", "API - PROMPT"), ParamError, "c", "malformed"),
    (workflow(), one("image", "ftp://x/a.png", "API - PROMPT"), ParamError, "c", "only http"),
]


CASE_IDS = [f"{culprit[:12]}: {message[:40]}" for _, _, _, culprit, message in CASES]


@pytest.mark.parametrize(("wf", "params", "error", "culprit", "message"), CASES, ids=CASE_IDS)
def test_odd_caller_input_is_a_typed_error_naming_the_culprit(
    wf: Any, params: Any, error: type[ComfyAPIError], culprit: str, message: str
) -> None:
    with pytest.raises(ComfyAPIError) as caught:
        validate_params(plugins(), wf, params)
        workflow_snapshot(wf)
    assert type(caught.value) is error, repr(caught.value)
    assert isinstance(caught.value, ParamError)
    assert caught.value.param == culprit
    assert message in str(caught.value)


def test_a_node_title_that_is_no_string_is_simply_no_title() -> None:
    wf = workflow()
    wf["21"]["_meta"]["title"] = 21
    wf["22"]["_meta"] = "API - BATCH SIZE"
    with pytest.raises(NodeTitleNotFoundError) as caught:
        validate_params(plugins(), wf, one("integer", 3))
    assert caught.value.param == "c"
    assert "API - STEP" not in caught.value.available
    assert validate_params(plugins(), wf, one("integer", 3, "API - PROMPT"))


async def test_a_plan_through_a_bad_caller_input_fails_before_any_io() -> None:
    # plan_job: the same checks, and the same errors, as the api's call.
    with pytest.raises(ParamError) as caught:
        await plan(std_plugins(), [1, 2], {})  # type: ignore[arg-type]
    assert caught.value.param == "workflow"


@pytest.mark.parametrize(
    ("lora", "error", "message"),
    [
        (LoRARef("a.safetensors", "http://x/a", strength=10**400), ParamError, "finite"),
        (LoRARef("a.safetensors", "http://x/a", strength=HUGE), ParamError, "<an int of"),
        (LoRARef("a.safetensors", "http://x/a", strength_clip=math.nan), ParamError, "finite"),
        (LoRARef("a.safetensors", "http://x/a", strength=True), ParamError, "finite"),
        (LoRARef("a.safetensors", "http://x/a", node_title=5), ParamError, "node_title"),  # type: ignore[arg-type]
        (LoRARef("a\x00.safetensors", "http://x/a"), UnsafeNameError, "a\\x00.safetensors"),
        (LoRARef("x" * 256, "http://x/a"), UnsafeNameError, "xxxx"),
        (LoRARef(None, "http://x/a"), UnsafeNameError, "None"),  # type: ignore[arg-type]
        (LoRARef("a.safetensors", "http://[::1/a"), DownloadError, "malformed"),
        (LoRARef("a.safetensors", None), DownloadError, "must be a string"),  # type: ignore[arg-type]
        (LoRARef("a.safetensors", "http://x/a", sha256=5), DownloadError, "64 hex"),  # type: ignore[arg-type]
    ],
    ids=[
        "strength-10**400",
        "strength-huge",
        "clip-nan",
        "strength-bool",
        "title-int",
        "name-nul",
        "name-256",
        "name-none",
        "url-ipv6",
        "url-none",
        "sha-int",
    ],
)
async def test_odd_loras_are_typed_errors(
    tmp_path: Path, lora: LoRARef, error: type[ComfyAPIError], message: str
) -> None:
    with pytest.raises(ComfyAPIError) as caught:
        await plan(std_plugins(), workflow(), loras=[lora], models_path=tmp_path / "models")
    assert type(caught.value) is error, repr(caught.value)
    assert message in str(caught.value)
    if isinstance(caught.value, ParamError):
        assert caught.value.param == "loras"
    assert not (tmp_path / "models").exists()  # refused before any I/O


# --------------------------------------------------------------------------- plugins' bugs


class Fragile(BaseParamType):
    """A third-party type whose validate trips over odd values."""

    name = "fragile"

    def validate(self, param: Param) -> None:
        param.value.upper()  # AttributeError for anything but a str


class FragilePlugin:
    @hookimpl
    def register_param_types(self, register: Any) -> None:
        register(Fragile())

    @hookimpl
    def default_params(self, workflow: Any, params: Any) -> Any:
        if "explode" in params:
            raise KeyError("boom")
        return ["not", "a", "dict"] if "list" in params else None


def test_a_plugins_bug_on_odd_input_is_a_plugin_error() -> None:
    fragile = std_plugins()
    fragile.register(FragilePlugin(), "fragile")
    with pytest.raises(PluginError, match="param type 'fragile' failed to validate param 'c'"):
        validate_params(fragile, workflow(), one("fragile", 5))
    explode = {"explode": {"type": "integer", "value": 1, "node_mappings": "API - STEP"}}
    with pytest.raises(PluginError, match="default_params hook failed: KeyError"):
        validate_params(fragile, workflow(), explode)
    listed = {"list": {"type": "integer", "value": 1, "node_mappings": "API - STEP"}}
    with pytest.raises(PluginError, match="returned a list, not a dict"):
        validate_params(fragile, workflow(), listed)


# --------------------------------------------------------------------------- property

TITLES = ["API - STEP", "API - PROMPT", "API - BATCH SIZE", "K - SEED", "Save Image", "nope"]
TYPES = ["integer", "string", "float", "boolean", "seed", "image", "nope"]


def huge(sign: int) -> int:
    """An int that repr() cannot show (hypothesis cannot show it as a strategy argument)."""
    return sign * HUGE


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]),
    st.sampled_from([1, -1]).map(huge),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec=None, categories=None)),  # NUL and lone surrogates too
    st.binary(max_size=8),
)
json_ish = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.one_of(st.text(max_size=5), st.integers(), st.none()), inner, max_size=4
        )
    ),
    max_leaves=12,
)
entries = st.one_of(
    json_ish,
    st.fixed_dictionaries(
        {
            "type": st.one_of(st.sampled_from(TYPES), json_ish),
            "value": json_ish,
            "node_mappings": st.one_of(
                st.sampled_from(TITLES), st.lists(st.sampled_from(TITLES), max_size=3), json_ish
            ),
        },
        optional={"gpu_scale": st.one_of(st.booleans(), json_ish), "extra": json_ish},
    ),
)
params_strategy = st.one_of(
    json_ish, st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), entries, max_size=4)
)


def mutated_workflow(changes: dict[Any, Any]) -> dict[Any, Any]:
    wf: dict[Any, Any] = workflow()
    wf.update(changes)
    return wf


workflows = st.one_of(
    st.builds(workflow),
    json_ish,
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), json_ish, max_size=4),
    st.dictionaries(st.text(max_size=3), json_ish, max_size=3).map(mutated_workflow),
)


@hypothesis.settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis folder in the work tree
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(wf=workflows, params=params_strategy)
def test_validate_params_only_ever_raises_comfy_api_errors(wf: Any, params: Any) -> None:
    error: ComfyAPIError | None = None
    try:
        validate_params(plugins(), wf, params)
        workflow_snapshot(wf)
    except ComfyAPIError as exc:  # anything else fails the test
        error = exc
    assert error is None or str(error)  # its message can be shown, whatever the input


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(
    type_name=st.sampled_from(TYPES[:-1]),
    value=json_ish,
    title=st.sampled_from(TITLES[:-1]),
    gpu_scale=st.booleans(),
)
def test_any_value_for_any_standard_type_is_accepted_or_a_param_error(
    type_name: str, value: Any, title: str, gpu_scale: bool
) -> None:
    params = {"c": {"type": type_name, "value": value, "node_mappings": title}}
    if gpu_scale:
        params["c"]["gpu_scale"] = True
    error: ParamError | None = None
    try:
        (checked, *_) = validate_params(plugins(), workflow(), params)
    except ParamError as exc:  # anything else fails the test
        error = exc
    if error is None:
        assert checked.value is value
    else:
        assert error.param == "c"
        assert str(error)

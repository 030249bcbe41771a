"""Every error ``comfytrio`` exports is in the error reference of docs/faults.md: under a
heading with its constructor's arguments and their types, with its base class, and with
every attribute an instance carries (name and type)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import comfytrio

PAGE = Path(__file__).resolve().parent.parent / "docs" / "faults.md"
HEADING = re.compile(r"^### `(\w+)\((.*)\)`$", re.MULTILINE)


def reference() -> str:
    text = PAGE.read_text(encoding="utf-8")
    start = text.index("\n## Error reference\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def sections() -> dict[str, tuple[str, str]]:
    """Class name -> (the arguments of its heading, the text up to the next heading)."""
    text = reference()
    found: dict[str, tuple[str, str]] = {}
    matches = list(HEADING.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        body = text[match.end() : following.start() if following else len(text)]
        found[match.group(1)] = (match.group(2), body)
    return found


def exported_errors() -> list[type[BaseException]]:
    return sorted(
        (
            value
            for name in dir(comfytrio)
            if not name.startswith("_")
            and isinstance(value := getattr(comfytrio, name), type)
            and issubclass(value, BaseException)
        ),
        key=lambda cls: cls.__name__,
    )


def split_arguments(text: str) -> list[str]:
    """``a: int, b: Mapping[str, Any] = {}`` as its parts, commas inside brackets kept."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def sample(annotation: str) -> Any:
    """A value of the annotated type (``str``, ``Sequence[str]``, ``float | None``...)."""
    if "None" in annotation.split(" | "):
        return None
    if annotation.startswith(("Sequence", "list")):
        return []
    if annotation.startswith(("Mapping", "dict")):
        return {}
    return {"str": "x", "int": 1, "float": 1.0, "bool": False}[annotation]


def an_instance(cls: type[BaseException]) -> BaseException:
    """``cls`` made with a value of the right type for each of its arguments."""
    signature = inspect.signature(cls.__init__)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, param in list(signature.parameters.items())[1:]:
        if param.default is not inspect.Parameter.empty:
            continue
        value = sample(str(param.annotation))
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[name] = value
        else:
            args.append(value)
    return cls(*args, **kwargs)


ERRORS = exported_errors()


def test_the_reference_is_found() -> None:
    assert len(ERRORS) >= 20
    assert comfytrio.ModelNotFoundError in ERRORS
    assert len(sections()) >= len(ERRORS)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_each_error_has_its_arguments_base_and_attributes_documented(
    cls: type[BaseException],
) -> None:
    documented = sections()
    assert cls.__name__ in documented, f"docs/faults.md's error reference lacks {cls.__name__}"
    arguments, body = documented[cls.__name__]
    base = cls.__mro__[1]
    assert f"Base: `{base.__name__}`" in body, f"{cls.__name__}: base {base.__name__} not said"

    own_init = "__init__" in vars(cls)
    if arguments == "...":
        assert not own_init, f"{cls.__name__} has arguments of its own: list them"
    else:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        parts = [p for p in split_arguments(arguments) if p != "*"]
        names = [part.split(":")[0].strip() for part in parts]
        assert names == [p.name for p in params], f"{cls.__name__}({arguments})"
        for part in parts:
            assert re.fullmatch(r"\w+: [^=]+( = .+)?", part), f"{cls.__name__}: no type in {part!r}"
        keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if keyword_only:
            star = split_arguments(arguments).index("*")
            assert names[star:] == keyword_only, f"{cls.__name__}: keyword-only arguments"

    # Every attribute an instance carries is named with its type, here or in a base's section.
    text = "".join(documented[c.__name__][1] for c in cls.__mro__ if c.__name__ in documented)
    instance = an_instance(cls)
    attributes = {name for name in vars(instance) if not name.startswith("_")}
    attributes |= {
        name
        for c in cls.__mro__
        if issubclass(c, comfytrio.ComfyAPIError)
        for name in vars(c).get("__annotations__", {})
    }
    for name in sorted(attributes):
        assert re.search(rf"`{name}: [^`]+`", text), f"{cls.__name__}.{name}: not documented"


def test_the_retryable_ones_are_said_to_be() -> None:
    documented = sections()
    for cls in ERRORS:
        if issubclass(cls, comfytrio.ServerError) and cls.retryable:
            assert "`retryable` is True" in documented[cls.__name__][1], cls.__name__

"""Output stores: the ``register_output_stores`` hook, ``Plugins.open_output_store``, and the
standard ``file`` and ``s3`` stores (the latter against a local S3 server: moto's server
mode on 127.0.0.1, port 0)."""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import boto3
import httpx
import pytest
import trio
from comfytrio_std import (
    DEFAULT_URL_EXPIRES,
    FolderStore,
    OutputKeyError,
    OutputStoreError,
    S3Store,
)
from moto.server import ThreadedMotoServer

import comfytrio
from comfytrio import ComfyAPIError, PluginError, UnsafeNameError, hookimpl
from comfytrio.hookspecs import OutputStore, StoredOutput

BAD_KEYS = ["../escape.png", "/etc/passwd", "a/../../b", "a//b", "a\\b", "", ".", "a/./b", "x\x00"]


def plugin_module(name: str, **hooks: Callable[..., object]) -> types.ModuleType:
    """A plugin as a module object, with the given hook implementations."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def std_plugins() -> comfytrio.Plugins:
    """A manager with the standard plugin only, registered as an entry point would be."""
    import comfytrio_std

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(comfytrio_std, "std")
    return plugins


class MemoryStore:
    """An output store in a dict: what a third-party plugin may register."""

    scheme: ClassVar[str] = "mem"

    def __init__(self, url: str) -> None:
        self.name = urlsplit(url).netloc
        self.objects: dict[str, bytes] = {}

    async def put(self, key: str, path: Path, *, content_type: str) -> StoredOutput:
        self.objects[key] = await trio.Path(path).read_bytes()
        size = len(self.objects[key])
        return StoredOutput(key=key, url=f"mem://{self.name}/{key}", size=size, content_type="x")

    async def get(self, key: str) -> bytes:
        return self.objects[key]

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def registers_memory_store(register: Callable[[str, Callable[[str], OutputStore]], None]) -> None:
    register("mem", MemoryStore)


# --------------------------------------------------------------------------- the hook


async def test_hook_register_output_stores(tmp_path: Path) -> None:
    plugins = std_plugins()
    assert plugins.output_store_schemes() == ["file", "s3"]
    plugins.register(plugin_module("mem", register_output_stores=registers_memory_store), "mem")
    assert plugins.output_store_schemes() == ["file", "mem", "s3"]

    store = plugins.open_output_store("mem://box")
    assert isinstance(store, MemoryStore)
    assert store.name == "box"
    (tmp_path / "a.png").write_bytes(b"png")
    stored = await store.put("job/a.png", tmp_path / "a.png", content_type="image/png")
    assert stored.url == "mem://box/job/a.png"
    assert await store.get("job/a.png") == b"png"

    # Listed by `comfytrio plugins` with what registered it.
    entries = {(e.kind, e.name): e for e in plugins.describe()}
    assert entries[("output store", "mem")].plugin == "mem"
    assert entries[("output store", "file")].plugin == "std"
    assert entries[("output store", "s3")].summary.endswith(".")

    plugins.unregister("mem")
    assert plugins.output_store_schemes() == ["file", "s3"]


def test_the_standard_stores_come_through_the_entry_point() -> None:
    plugins = comfytrio.make_plugin_manager()
    assert {"file", "s3"} <= set(plugins.output_store_schemes())
    assert isinstance(plugins.open_output_store("file:///shared/outputs"), FolderStore)


def test_a_scheme_registered_twice_names_both_plugins() -> None:
    plugins = std_plugins()
    with pytest.raises(PluginError, match="scheme 'file' is registered twice") as caught:
        plugins.register(
            plugin_module("dup", register_output_stores=lambda register: register("file", str)),
            "dup",
        )
    assert "'std'" in str(caught.value)
    assert "'dup'" in str(caught.value)
    assert plugins.names() == ["std"]  # the manager is left as it was


@pytest.mark.parametrize(
    ("scheme", "factory", "message"),
    [
        ("S3", str, "not a lower-case URL scheme"),
        ("", str, "not a lower-case URL scheme"),
        ("mem", "not callable", "is not callable"),
    ],
)
def test_a_bad_registration_is_a_plugin_error(scheme: str, factory: object, message: str) -> None:
    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    bad = plugin_module("bad", register_output_stores=lambda register: register(scheme, factory))
    with pytest.raises(PluginError, match=message):
        plugins.register(bad, "bad")


def test_an_unknown_scheme_names_the_url_and_the_installed_schemes() -> None:
    with pytest.raises(PluginError, match="gs://bucket/outputs") as caught:
        std_plugins().open_output_store("gs://bucket/outputs")
    assert "installed schemes: file, s3" in str(caught.value)

    with pytest.raises(PluginError, match="installed schemes: none"):
        comfytrio.make_plugin_manager(entrypoints=False).open_output_store("/shared")

    with pytest.raises(PluginError, match="'relative/path'"):
        std_plugins().open_output_store("relative/path")


def test_an_unknown_scheme_error_hides_a_password() -> None:
    with pytest.raises(PluginError) as caught:
        std_plugins().open_output_store("ftp://user:hunter2@host/outputs")
    assert "hunter2" not in str(caught.value)


def test_a_factory_that_fails_is_a_plugin_error_naming_it() -> None:
    def broken(url: str) -> OutputStore:
        raise RuntimeError("no config")

    plugins = comfytrio.make_plugin_manager(entrypoints=False)
    plugins.register(
        plugin_module("b", register_output_stores=lambda register: register("b", broken)), "b"
    )
    with pytest.raises(PluginError, match=r"output store 'b' \(plugin 'b'\) failed to open"):
        plugins.open_output_store("b://x")

    plugins.register(
        plugin_module("n", register_output_stores=lambda register: register("n", str)), "n"
    )
    with pytest.raises(PluginError, match="lacks put, get, delete"):
        plugins.open_output_store("n://x")


# --------------------------------------------------------------------------- file


def test_a_file_url_or_an_absolute_path_opens_a_folder_store() -> None:
    plugins = std_plugins()
    assert plugins.open_output_store("file:///shared/outputs") == FolderStore(
        Path("/shared/outputs")
    )
    assert plugins.open_output_store("/shared/outputs") == FolderStore(Path("/shared/outputs"))
    assert plugins.open_output_store("file://localhost/shared/my%20outputs") == FolderStore(
        Path("/shared/my outputs")
    )


@pytest.mark.parametrize(
    "url", ["file://nas/shared", "file:///shared?mode=1", "file:relative", "file://"]
)
def test_a_bad_file_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"output store|absolute"):
        std_plugins().open_output_store(url)


async def test_folder_store_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    store = std_plugins().open_output_store(root.as_uri())
    source = tmp_path / "out.png"
    source.write_bytes(b"\x89PNG" + os.urandom(3000))

    stored = await store.put("job-1/0/0-9-out.png", source, content_type="image/png")
    assert stored == StoredOutput(
        key="job-1/0/0-9-out.png",
        url=(root / "job-1/0/0-9-out.png").as_uri(),
        size=source.stat().st_size,
        content_type="image/png",
    )
    assert stored.url.startswith("file:///")
    assert Path(urlsplit(stored.url).path).read_bytes() == source.read_bytes()
    assert await store.get("job-1/0/0-9-out.png") == source.read_bytes()

    # A key stored again is replaced.
    source.write_bytes(b"second")
    again = await store.put("job-1/0/0-9-out.png", source, content_type="image/png")
    assert again.size == 6
    assert await store.get("job-1/0/0-9-out.png") == b"second"

    await store.delete("job-1/0/0-9-out.png")
    with pytest.raises(KeyError):
        await store.get("job-1/0/0-9-out.png")
    await store.delete("job-1/0/0-9-out.png")  # not there: nothing happens
    # No temp file is left anywhere.
    assert [p for p in root.rglob("*") if p.is_file()] == []


async def test_a_file_url_with_spaces_is_a_valid_uri(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    (tmp_path / "src").write_bytes(b"x")
    stored = await store.put("my job/a b#1.png", tmp_path / "src", content_type="image/png")
    assert " " not in stored.url
    assert "#" not in stored.url
    assert Path(urlsplit(stored.url).path.replace("%20", " ").replace("%23", "#")).exists()


async def test_a_cancelled_put_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    store = FolderStore(root, chunk_size=4096)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(32 * 1024 * 1024))
    dest = root / "job" / "big.bin"

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def put() -> None:
                await store.put("job/big.bin", source, content_type="application/octet-stream")
                raise AssertionError("the put finished before it was cancelled")

            nursery.start_soon(put)
            # Wait until the put is midway: its temp file exists and holds some bytes (an
            # event on the file system, so it is polled).
            while not any(p.stat().st_size for p in root.glob("job/.part-*")):  # noqa: ASYNC110
                await trio.sleep(0.001)
            assert not dest.exists()  # a reader never sees the file while it is written
            nursery.cancel_scope.cancel()

    assert not dest.exists()
    assert [p for p in root.rglob("*") if p.is_file()] == []


async def test_a_failed_put_is_an_output_store_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"a file where a folder should be")
    store = FolderStore(tmp_path)
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(OutputStoreError, match=r"blocker/a\.png") as caught:
        await store.put("blocker/a.png", tmp_path / "src", content_type="image/png")
    assert caught.value.key == "blocker/a.png"
    with pytest.raises(OutputStoreError, match="cannot read"):
        await store.put("a.png", tmp_path / "missing", content_type="image/png")


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_folder_store_refuses_bad_keys(tmp_path: Path, key: str) -> None:
    store = FolderStore(tmp_path / "outputs")
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(ValueError, match="refusing output key") as caught:
        await store.put(key, tmp_path / "src", content_type="image/png")
    assert caught.value.key == key  # type: ignore[attr-defined]
    assert isinstance(caught.value, UnsafeNameError)
    assert isinstance(caught.value, ComfyAPIError)
    with pytest.raises(OutputKeyError):
        await store.get(key)
    with pytest.raises(OutputKeyError):
        await store.delete(key)
    assert not (tmp_path / "outputs").exists()  # refused before any I/O


async def test_folder_store_get_of_something_not_a_file_is_a_key_error(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    store = FolderStore(tmp_path)
    for key in ("folder", "fifo", "missing/deeper"):
        with pytest.raises(KeyError):
            await store.get(key)


# --------------------------------------------------------------------------- s3


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A local S3 server (moto's server mode) on 127.0.0.1; its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The local S3 server, with fake credentials in the environment (and no AWS config
    of the machine's read), and an empty bucket ``outputs``."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for bucket in s3.list_buckets()["Buckets"]:
        for item in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            s3.delete_object(Bucket=bucket["Name"], Key=item["Key"])
        s3.delete_bucket(Bucket=bucket["Name"])
    s3.create_bucket(Bucket="outputs")
    return s3_server


async def test_s3_store_round_trip_with_a_presigned_url(s3_endpoint: str, tmp_path: Path) -> None:
    url = f"s3://outputs/runs?endpoint_url={s3_endpoint}&region=us-east-1&url_expires=600"
    store = std_plugins().open_output_store(url)
    assert isinstance(store, S3Store)
    assert store.url_expires == 600
    source = tmp_path / "out.png"
    source.write_bytes(b"\x89PNG" + os.urandom(100_000))

    stored = await store.put("job-1/0/0-9-out.png", source, content_type="image/png")
    assert stored.key == "job-1/0/0-9-out.png"
    assert stored.size == source.stat().st_size
    assert stored.content_type == "image/png"
    assert stored.url.startswith(f"{s3_endpoint}/outputs/runs/job-1/0/0-9-out.png?")
    assert "Expires=600" in stored.url
    async with httpx.AsyncClient() as http:
        response = await http.get(stored.url)
    assert response.status_code == 200
    assert response.content == source.read_bytes()
    assert response.headers["content-type"] == "image/png"

    # The object sits under the prefix.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket="outputs")["Contents"]
    assert [item["Key"] for item in listed] == ["runs/job-1/0/0-9-out.png"]

    assert await store.get("job-1/0/0-9-out.png") == source.read_bytes()
    await store.delete("job-1/0/0-9-out.png")
    with pytest.raises(KeyError):
        await store.get("job-1/0/0-9-out.png")
    await store.delete("job-1/0/0-9-out.png")  # not there: nothing happens


async def test_s3_store_public_url(s3_endpoint: str, tmp_path: Path) -> None:
    store = std_plugins().open_output_store(
        f"s3://outputs?endpoint_url={s3_endpoint}&public_url=https://cdn.example.com/o"
    )
    assert isinstance(store, S3Store)
    assert store.url_expires == DEFAULT_URL_EXPIRES
    (tmp_path / "src").write_bytes(b"abc")
    stored = await store.put("job 1/a.png", tmp_path / "src", content_type="image/png")
    assert stored.url == "https://cdn.example.com/o/job%201/a.png"
    assert await store.get("job 1/a.png") == b"abc"


async def test_s3_errors_name_the_bucket_and_the_key(s3_endpoint: str, tmp_path: Path) -> None:
    store = std_plugins().open_output_store(f"s3://no-such-bucket/p?endpoint_url={s3_endpoint}")
    (tmp_path / "src").write_bytes(b"abc")
    with pytest.raises(OutputStoreError) as caught:
        await store.put("job/a.png", tmp_path / "src", content_type="image/png")
    message = str(caught.value)
    assert "'no-such-bucket'" in message
    assert "'p/job/a.png'" in message
    assert caught.value.key == "job/a.png"
    assert caught.value.store == "s3://no-such-bucket/p/"
    with pytest.raises(OutputStoreError, match=r"cannot read|No such file"):
        await store.put("job/b.png", tmp_path / "missing", content_type="image/png")


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_s3_store_refuses_bad_keys(s3_endpoint: str, tmp_path: Path, key: str) -> None:
    store = std_plugins().open_output_store(f"s3://outputs/p?endpoint_url={s3_endpoint}")
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(ValueError, match="refusing output key"):
        await store.put(key, tmp_path / "src", content_type="image/png")
    with pytest.raises(OutputKeyError):
        await store.get(key)
    with pytest.raises(OutputKeyError):
        await store.delete(key)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "expected s3://bucket/prefix"),
        ("s3://bucket?endpoint=http://x", "unknown option.*endpoint"),
        ("s3://bucket?url_expires=soon", "whole numbers"),
        ("s3://bucket?url_expires=0", "url_expires must be"),
        ("s3://bucket?url_expires=604801", "url_expires must be"),
        ("s3://bucket?region=a&region=b", "given twice"),
        ("s3://bucket?endpoint_url=ftp://x", "endpoint_url must be"),
        ("s3://bucket?public_url=cdn.example.com", "public_url must be"),
        ("s3://bucket?addressing_style=sideways", "addressing_style"),
        ("s3://bucket/a/../b", "refusing output key"),
    ],
)
def test_a_bad_s3_url_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        std_plugins().open_output_store(url)


def test_without_boto3_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_boto3(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] in ("boto3", "botocore"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_boto3)
    with pytest.raises(OutputStoreError, match=r"pip install 'comfytrio\[s3\]'"):
        std_plugins().open_output_store("s3://bucket/prefix")


def test_the_core_does_not_import_boto3() -> None:
    import subprocess
    import sys

    code = (
        "import sys, comfytrio; plugins = comfytrio.make_plugin_manager(); "
        "plugins.open_output_store('file:///tmp/x'); "
        "assert not {'boto3', 'botocore'} & set(sys.modules), 'boto3 imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""``fedsim data download``: against an HTTP server on 127.0.0.1 serving archives written here,
with checksum mismatches, interrupted transfers that resume, and hostile archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import fedsim.data
from fedsim.cli import main
from fedsim.data import load_dataset
from fedsim.data.download import download
from fedsim.data.sources import SOURCES, Resource, Source
from fedsim.errors import UserError

from .test_data_loaders import cifar_records, idx_bytes


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_short: dict[str, int] = field(default_factory=dict)  # path -> responses to break off halfway
    ignore_range: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        asked = self.headers.get("Range")
        state.requests.append((self.path, asked))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if asked and self.path not in state.ignore_range:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cut_short.get(self.path, 0) > 0:
            state.cut_short[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])  # then the connection closes: a broken transfer
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDSIM_DATA", raising=False)
    monkeypatch.setattr(fedsim.data, "_LOADED", {})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def tiny_cifar10_archive() -> bytes:
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{n}.bin" for n in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
        members[f"cifar-10-batches-bin/{name}"] = cifar_records(images, np.array([1, 7]))
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    return tar_gz(members)


def local_source(name: str, url: str, files: dict[str, bytes], unpack: bool = False, checksum: bool = True) -> Source:
    """The real catalogue entry of ``name``, downloading ``files`` from the local server instead."""
    resources = tuple(
        Resource(f"{url}/{file}", file, sha256=sha256(data) if checksum else None, unpack=unpack)
        for file, data in files.items()
    )
    return replace(SOURCES[name], resources=resources)


def make_source(name: str, *resources: Resource) -> Source:
    return Source(name, "https://example.org", "the test's files", folder=name, search=(name,), resources=resources)


def test_cli_downloads_unpacks_and_the_loader_reads_it(server, tmp_path, monkeypatch, capsys):
    state, url = server
    archive = tiny_cifar10_archive()
    state.files["/cifar-10-binary.tar.gz"] = archive
    monkeypatch.setitem(SOURCES, "cifar10", local_source("cifar10", url, {"cifar-10-binary.tar.gz": archive}, True))
    assert main(["data", "download", "cifar10", "--root", str(tmp_path / "data")]) == 0
    assert "ready in" in capsys.readouterr().out
    folder = tmp_path / "data" / "cifar10"
    assert (folder / "cifar-10-binary.tar.gz").read_bytes() == archive
    assert not list(folder.glob("*.part")) and not list(folder.glob(".*unpacking*"))
    dataset = load_dataset("cifar10", root=str(tmp_path / "data"))
    assert dataset.x_train.shape == (10, 3, 32, 32) and list(dataset.y_test) == [1, 7]

    requests = len(state.requests)
    assert main(["data", "download", "cifar10", "--root", str(tmp_path / "data")]) == 0
    assert len(state.requests) == requests  # verified files are kept, not fetched again

    # A damaged archive is fetched again and unpacked again over the old files.
    (folder / "cifar-10-binary.tar.gz").write_bytes(b"damaged")
    (folder / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"stale")
    assert main(["data", "download", "cifar10", "--root", str(tmp_path / "data")]) == 0
    assert len(state.requests) == requests + 1
    assert len((folder / "cifar-10-batches-bin" / "test_batch.bin").read_bytes()) == 2 * 3073


def test_cli_downloads_idx_files_for_mnist(server, tmp_path, monkeypatch):
    state, url = server
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images)),
        "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images[:2])),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels[:2])),
    }
    state.files.update({f"/{name}": data for name, data in files.items()})
    monkeypatch.setitem(SOURCES, "mnist", local_source("mnist", url, files))
    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path / "default-root"))
    assert main(["data", "download", "mnist"]) == 0
    dataset = load_dataset("mnist")  # the default root is where the download went
    assert list(dataset.y_train) == [3, 1, 4, 1]


def test_checksum_mismatch_is_one_line_and_leaves_no_file(server, tmp_path, monkeypatch, capsys):
    state, url = server
    good = tiny_cifar10_archive()
    state.files["/cifar-10-binary.tar.gz"] = good[:-20] + b"corrupted at the end"
    monkeypatch.setitem(SOURCES, "cifar10", local_source("cifar10", url, {"cifar-10-binary.tar.gz": good}, True))
    assert main(["data", "download", "cifar10", "--root", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and f"expected {sha256(good)}" in message and "deleted" in message
    assert sorted(p.name for p in (tmp_path / "cifar10").iterdir()) == []  # no archive, no .part, nothing unpacked


def test_broken_transfer_resumes_with_a_range_request(server, tmp_path):
    state, url = server
    data = bytes(range(256)) * 400
    state.files["/blob.bin"] = data
    state.cut_short["/blob.bin"] = 1
    source = make_source("blob", Resource(f"{url}/blob.bin", "blob.bin", sha256(data)))
    download(source, tmp_path, log=lambda _: None)
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data
    assert state.requests == [("/blob.bin", None), ("/blob.bin", f"bytes={len(data) // 2}-")]


def test_failed_download_keeps_its_part_file_and_the_next_run_resumes(server, tmp_path):
    state, url = server
    data = b"0123456789" * 5000
    state.files["/blob.bin"] = data
    state.cut_short["/blob.bin"] = 1
    source = make_source("blob", Resource(f"{url}/blob.bin", "blob.bin", sha256(data)))
    with pytest.raises(UserError) as error:
        download(source, tmp_path, attempts=1, log=lambda _: None)
    assert "run the same command again to resume" in str(error.value)
    partial = tmp_path / "blob" / "blob.bin.part"
    assert partial.read_bytes() == data[: len(data) // 2] and not (tmp_path / "blob" / "blob.bin").exists()
    download(source, tmp_path, attempts=1, log=lambda _: None)
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data and not partial.exists()
    assert state.requests[-1] == ("/blob.bin", f"bytes={len(data) // 2}-")


def test_server_that_ignores_range_restarts_the_file(server, tmp_path):
    state, url = server
    data = b"abcdefghij" * 3000
    state.files["/blob.bin"] = data
    state.ignore_range.add("/blob.bin")
    (tmp_path / "blob").mkdir()
    (tmp_path / "blob" / "blob.bin.part").write_bytes(data[:1000])
    source = make_source("blob", Resource(f"{url}/blob.bin", "blob.bin", sha256(data)))
    download(source, tmp_path, log=lambda _: None)
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data  # not the first 1,000 bytes twice


def test_md5_is_used_when_no_sha256_is_published(server, tmp_path):
    state, url = server
    state.files["/usps.bz2"] = b"payload"
    wrong = Resource(f"{url}/usps.bz2", "usps.bz2", md5=hashlib.md5(b"other").hexdigest())
    source = make_source("usps", wrong)
    with pytest.raises(UserError, match=f"md5 {hashlib.md5(b'payload').hexdigest()}"):
        download(source, tmp_path, log=lambda _: None)


def test_path_traversal_in_an_archive_is_refused(server, tmp_path):
    state, url = server
    for name, archive in {
        "evil.tar.gz": tar_gz({"ok.txt": b"fine", "../../escaped.txt": b"gotcha"}),
        "evil.zip": zip_bytes({"ok.txt": b"fine", "../escaped.txt": b"gotcha"}),
        "absolute.tar.gz": tar_gz({"/tmp/escaped-absolute.txt": b"gotcha"}),
    }.items():
        state.files[f"/{name}"] = archive
        resource = Resource(f"{url}/{name}", name, sha256(archive), unpack=True)
        source = make_source("evil", resource)
        with pytest.raises(UserError, match="refusing to unpack"):
            download(source, tmp_path / "root", log=lambda _: None)
        assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "root" / "escaped.txt").exists()
        assert not (tmp_path / "root" / "evil" / "ok.txt").exists()  # nothing half-unpacked either


def test_links_in_a_tar_are_refused(server, tmp_path):
    state, url = server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("data")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    state.files["/link.tar.gz"] = buffer.getvalue()
    resource = Resource(f"{url}/link.tar.gz", "link.tar.gz", sha256(buffer.getvalue()), unpack=True)
    with pytest.raises(UserError, match="is a link"):
        download(make_source("links", resource), tmp_path, log=lambda _: None)
    assert not (tmp_path / "links" / "data").exists()


def test_unverifiable_corrupt_zip_is_deleted_so_the_next_run_fetches_it_again(server, tmp_path, monkeypatch):
    state, url = server
    good = zip_bytes({"clipart/bird/a.png": b"not checked here"})
    state.files["/clipart.zip"] = good[:40] + b"\x00" * 30 + good[70:]  # damaged inside a member
    monkeypatch.setitem(
        SOURCES, "domainnet", local_source("domainnet", url, {"clipart.zip": good}, True, checksum=False)
    )
    logged: list[str] = []
    with pytest.raises(UserError, match="cannot unpack .*it was deleted"):
        download(SOURCES["domainnet"], tmp_path, log=logged.append)
    assert any("no checksum is published" in line for line in logged)
    assert not (tmp_path / "domainnet" / "clipart.zip").exists()
    state.files["/clipart.zip"] = good
    download(SOURCES["domainnet"], tmp_path, log=logged.append)
    assert (tmp_path / "domainnet" / "clipart" / "bird" / "a.png").read_bytes() == b"not checked here"


def test_http_error_and_manual_datasets_are_one_line(server, tmp_path, capsys):
    _, url = server
    source = make_source("gone", Resource(f"{url}/missing.bin", "missing.bin"))
    with pytest.raises(UserError, match="answered HTTP 404"):
        download(source, tmp_path, log=lambda _: None)
    assert main(["data", "download", "pacs", "--root", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "no direct download" in error and "https://domaingeneralization.github.io/" in error


def test_published_sources_name_real_urls_and_checksums():
    for name, source in SOURCES.items():
        assert source.homepage.startswith("http"), name
        for resource in source.resources:
            assert resource.url.startswith(("http://", "https://")) and resource.url.endswith(resource.filename)
            if resource.sha256:
                assert len(resource.sha256) == 64 and int(resource.sha256, 16) >= 0
            if resource.md5:
                assert len(resource.md5) == 32 and int(resource.md5, 16) >= 0
    verified = [
        name
        for name, source in SOURCES.items()
        if source.resources and all(r.sha256 or r.md5 for r in source.resources)
    ]
    assert verified == ["mnist", "fashion-mnist", "kmnist", "usps", "svhn", "cifar10", "cifar100"]


def test_path_of_default_root_is_used_when_no_root_is_given(tmp_path, monkeypatch):
    from fedsim.data.sources import data_root

    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path / "here"))
    assert data_root(None) == tmp_path / "here"
    monkeypatch.delenv("FEDSIM_DATA")
    assert data_root(None) == Path(tmp_path / "cache" / "data")
    assert data_root("~/x") == Path.home() / "x"

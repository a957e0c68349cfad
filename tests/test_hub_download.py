"""Checkpoints from URLs: downloaded from a real HTTP server on 127.0.0.1 into ``$VITLAB_HOME``, resumed, checked,
atomic, shared safely between processes, reused offline."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitlab
from tests.checkpoint_fixtures import random_timm_vit, save_npz, vit_jax_arrays
from tests.hub_fixtures import FileServer
from vitlab.errors import VitlabError
from vitlab.hub import cache_path
from vitlab.hub.download import fetch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory) -> bytes:
    """A small ViT in the vit_jax npz layout (about 1.3 MB: enough chunks for a cut transfer)."""
    path = tmp_path_factory.mktemp("npz") / "vit.npz"
    save_npz(path, vit_jax_arrays(random_timm_vit(num_classes=5, width=192, depth=2)))
    return path.read_bytes()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "vitlab-home"))
    monkeypatch.delenv("VITLAB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "vitlab-home"


@pytest.fixture
def server(npz_bytes):
    srv = FileServer({"/models/vit.npz": npz_bytes})
    yield srv
    srv.stop()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_first_download_then_cache_hit_with_the_server_stopped(home, server, npz_bytes, tmp_path):
    url = f"{server.url}/models/vit.npz"
    path = fetch(url, sha256=hashlib.sha256(npz_bytes).hexdigest())
    assert path == cache_path(url) and path.read_bytes() == npz_bytes
    assert str(path).startswith(str(home / "url" / "127.0.0.1_"))
    local = tmp_path / "local.npz"
    local.write_bytes(npz_bytes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vitlab.load(local)(x)
    server.stop()
    with torch.no_grad():  # no server: the cached copy, through the same loader
        got = vitlab.load(url)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(server.gets("/models/vit.npz")) == 1


def test_transfer_cut_mid_way_is_resumed_with_a_range_request(home, server, npz_bytes):
    server.cut_after = 300_000
    url = f"{server.url}/models/vit.npz"
    path = fetch(url, size=len(npz_bytes))
    assert path.read_bytes() == npz_bytes
    assert server.gets("/models/vit.npz") == [None, "bytes=300000-"]
    assert _leftovers(home) == ["vit.npz"]


def test_partial_file_from_an_earlier_run_is_resumed(home, server, npz_bytes):
    url = f"{server.url}/models/vit.npz"
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    dest.with_name("vit.npz.part").write_bytes(npz_bytes[:123_456])
    assert fetch(url).read_bytes() == npz_bytes
    assert server.gets("/models/vit.npz") == ["bytes=123456-"]


def test_wrong_sha256_is_refused_and_nothing_is_left_behind(home, server):
    url = f"{server.url}/models/vit.npz"
    with pytest.raises(VitlabError, match="sha256 .* does not match .*nothing was cached"):
        fetch(url, sha256="0" * 64)
    assert _leftovers(home) == []
    with pytest.raises(VitlabError, match="the catalog says 99"):
        fetch(url, size=99)
    assert _leftovers(home) == []


def test_good_cached_copy_is_never_replaced(home, server, npz_bytes):
    url = f"{server.url}/models/vit.npz"
    fetch(url)
    server.files["/models/vit.npz"] = b"garbage" * 1000  # the server now serves something else
    assert fetch(url).read_bytes() == npz_bytes
    assert len(server.gets("/models/vit.npz")) == 1


@pytest.mark.parametrize("binary", [False, True], ids=["text/html", "html-as-octet-stream"])
def test_html_page_instead_of_the_file_is_refused_as_such(home, server, binary):
    server.html, server.html_as_binary = True, binary
    with pytest.raises(VitlabError, match="HTML page"):
        fetch(f"{server.url}/models/vit.npz")
    assert _leftovers(home) == []


def test_missing_file_and_no_network_give_one_line_with_url_cache_path_and_how_to_place_it(home, server):
    with pytest.raises(VitlabError, match="404"):
        fetch(f"{server.url}/models/missing.npz")
    server.stop()
    url = f"{server.url}/models/vit.npz"
    with pytest.raises(VitlabError) as info:
        fetch(url)
    message = str(info.value)
    assert "\n" not in message and url in message and str(cache_path(url)) in message and "curl" in message


def test_offline_switch_names_the_missing_file_and_uses_the_cache(home, server, npz_bytes, monkeypatch):
    url = f"{server.url}/models/vit.npz"
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    with pytest.raises(VitlabError, match=f"not in the cache and network use is off.*{cache_path(url)}"):
        fetch(url)
    assert server.requests == []
    monkeypatch.setenv("VITLAB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub's switch is honoured too
    with pytest.raises(VitlabError, match="network use is off"):
        fetch(url)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fetch(url)
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    assert fetch(url).read_bytes() == npz_bytes  # cached: fine offline


def test_cli_offline_flag(home, server, capsys):
    from vitlab.cli import main

    assert main(["--offline", "info", f"{server.url}/models/vit.npz"]) == 2
    assert "network use is off" in capsys.readouterr().err
    assert server.requests == []
    os.environ.pop("VITLAB_OFFLINE", None)


def test_two_processes_fetching_the_same_file_end_with_one_good_file(home, server, npz_bytes):
    server.delay = 0.01  # about 0.2 s per transfer, so that the two overlap
    url = f"{server.url}/models/vit.npz"
    code = "import sys; from vitlab.hub.download import fetch; print(fetch(sys.argv[1], progress=False))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VITLAB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert paths == {str(cache_path(url))}
    assert cache_path(url).read_bytes() == npz_bytes
    assert _leftovers(home) == ["vit.npz"]
    assert server.gets("/models/vit.npz") == [None]  # the second process waited and used the first one's file

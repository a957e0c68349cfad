"""Checkpoints from URLs: downloaded from a real HTTP server on 127.0.0.1 into ``$VITLAB_HOME``, resumed, checked,
atomic, shared safely between processes, reused offline."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import torch

import vitlab
from tests.checkpoint_fixtures import random_timm_vit, save_npz, vit_jax_arrays
from tests.hub_fixtures import FileServer
from vitlab.errors import VitlabError
from vitlab.hub import cache_path, download
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


def test_partial_file_from_an_earlier_run_is_resumed(home, server, npz_bytes, monkeypatch):
    url = f"{server.url}/models/vit.npz"
    server.cut_after = 123_456
    monkeypatch.setattr(download, "RETRIES", 0)  # the earlier run gives up after the cut
    with pytest.raises(VitlabError, match="123456 bytes kept"):
        fetch(url)
    monkeypatch.setattr(download, "RETRIES", 5)
    assert fetch(url).read_bytes() == npz_bytes
    assert server.gets("/models/vit.npz") == [None, "bytes=123456-"]


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


# A broken or hostile server never gets a bad file kept under its final name: lengths and ranges are checked, and the
# complete file's own structure (safetensors offsets, zip members, legacy torch.save storages) before the rename.

@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, bytes]:
    """The same small state dict as safetensors, npz, torch.save (zip) and legacy torch.save, a few hundred KB each."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("formats")
    model = random_timm_vit(num_classes=5, width=64, heads=2, mlp=128, depth=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "m.safetensors"))
    save_npz(folder / "m.npz", vit_jax_arrays(model))
    torch.save(state, folder / "m.pth")
    torch.save(state, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def format_server(formats):
    srv = FileServer({f"/f/{name}": data for name, data in formats.items()})
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", ["m.safetensors", "m.npz", "m.pth", "legacy.pth"])
def test_content_length_of_half_the_file_is_never_cached(home, format_server, name):
    format_server.lie_length = True
    url = f"{format_server.url}/f/{name}"
    with pytest.raises(VitlabError, match="incomplete or corrupt|truncated|cut") as info:
        fetch(url)
    assert "nothing was cached" in str(info.value) and "\n" not in str(info.value)
    assert _leftovers(home) == []


@pytest.mark.parametrize("name", ["m.safetensors", "m.npz", "legacy.pth"])
def test_no_length_and_a_cut_connection_is_never_cached(home, format_server, formats, name):
    format_server.no_length, format_server.cut_after = True, len(formats[name]) * 2 // 3
    with pytest.raises(VitlabError, match="nothing was cached"):
        fetch(f"{format_server.url}/f/{name}")
    assert _leftovers(home) == []
    format_server.no_length = False  # a good server afterwards: downloaded whole
    assert fetch(f"{format_server.url}/f/{name}").read_bytes() == formats[name]


def test_a_206_that_resends_the_whole_file_is_not_appended(home, format_server, formats):
    format_server.cut_after, format_server.whole_206 = 100_000, True
    url = f"{format_server.url}/f/m.safetensors"
    assert fetch(url).read_bytes() == formats["m.safetensors"]  # the bad 206 is dropped, the file fetched again
    assert format_server.gets("/f/m.safetensors") == [None, "bytes=100000-", None]


def test_stale_part_of_another_file_is_not_resumed(home, server, npz_bytes, formats):
    url = f"{server.url}/models/vit.npz"
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    dest.with_name("vit.npz.part").write_bytes(formats["m.npz"][:123_456])  # no record of where it came from
    assert fetch(url).read_bytes() == npz_bytes
    assert server.gets("/models/vit.npz") == [None]


def test_part_of_a_file_changed_on_the_server_since_is_fetched_whole(home, server, npz_bytes, formats, monkeypatch):
    url = f"{server.url}/models/vit.npz"
    server.cut_after = 123_456
    monkeypatch.setattr(download, "RETRIES", 0)
    with pytest.raises(VitlabError, match="run again to resume"):
        fetch(url)
    monkeypatch.setattr(download, "RETRIES", 5)
    server.files["/models/vit.npz"] = formats["m.npz"]  # a new version: If-Range no longer matches
    assert fetch(url).read_bytes() == formats["m.npz"]
    assert server.gets("/models/vit.npz") == [None, "bytes=123456-"]


@pytest.mark.parametrize("name", ["m.safetensors", "m.npz", "legacy.pth"])
def test_cut_file_in_the_cache_is_fetched_again_or_named_for_deletion_offline(home, format_server, formats, name,
                                                                               monkeypatch, capsys):
    url = f"{format_server.url}/f/{name}"
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(formats[name][: len(formats[name]) - 1000])  # a cut copy, put there by an older version
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    with pytest.raises(VitlabError, match=f"incomplete or corrupt.*delete {dest}"):
        fetch(url)
    monkeypatch.delenv("VITLAB_OFFLINE")
    assert fetch(url).read_bytes() == formats[name]
    assert "downloading it again" in capsys.readouterr().err
    assert len(format_server.gets(f"/f/{name}")) == 1


def test_structure_check_accepts_every_whole_file(tmp_path, formats):
    for name, data in formats.items():
        (tmp_path / name).write_bytes(data)
        assert download.structure_problem(tmp_path / name) is None, name
        (tmp_path / name).write_bytes(data[:-1])
        assert download.structure_problem(tmp_path / name) is not None, name
        (tmp_path / name).write_bytes(data + b"\0")
        assert download.structure_problem(tmp_path / name) is not None, name


@pytest.mark.parametrize("entry", ["vit.npz.part", "vit.npz.part.json", "vit.npz.lock", "host-folder", "url-folder"])
def test_symlink_in_the_cache_is_refused_and_nothing_is_written_through_it(home, server, tmp_path, entry):
    url = f"{server.url}/models/vit.npz"
    dest = cache_path(url)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_bytes(b"precious")
    if entry == "host-folder":  # $VITLAB_HOME/url/127.0.0.1_PORT -> a folder outside the cache
        dest.parent.parent.mkdir(parents=True)
        dest.parent.symlink_to(victim, target_is_directory=True)
    elif entry == "url-folder":
        home.mkdir()
        (home / "url").symlink_to(victim, target_is_directory=True)
    else:
        dest.parent.mkdir(parents=True)
        dest.with_name(entry).symlink_to(victim / "file")
    with pytest.raises(VitlabError, match="a symlink inside the download cache") as info:
        fetch(url)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in victim.rglob("*")) == ["file"] and (victim / "file").read_bytes() == b"precious"
    assert server.requests == []


@pytest.mark.parametrize("path", ["/models/vit%00.npz", "/models/a%0Ab.npz", "/models/a%5Cb.npz"])
def test_url_with_nul_or_control_characters_is_one_line(home, server, path):
    with pytest.raises(VitlabError, match="control character, NUL or backslash") as info:
        fetch(f"{server.url}{path}")
    assert "\n" not in str(info.value) and server.requests == []


def test_file_name_over_255_bytes_is_cached_under_a_shortened_name(home, server, npz_bytes):
    name = "é" * 200 + ".npz"  # 404 bytes in UTF-8
    server.files["/models/" + urllib.parse.quote(name)] = npz_bytes
    url = f"{server.url}/models/{urllib.parse.quote(name)}"
    path = fetch(url)
    assert path.read_bytes() == npz_bytes and path.suffix == ".npz" and len(path.name.encode()) <= 200
    other = cache_path(f"{server.url}/models/{urllib.parse.quote('é' * 199 + 'x.npz')}")
    assert other != path and other.parent == path.parent  # names that share their start stay apart


def test_unwritable_cache_is_one_line_naming_it(home, server, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VITLAB_HOME", str(blocker / "cache"))  # what a read-only or missing mount also gives
    with pytest.raises(VitlabError, match="cannot write to the download cache .*VITLAB_HOME") as info:
        fetch(f"{server.url}/models/vit.npz")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_disk_filling_up_mid_download_is_one_line_and_the_next_run_resumes(home, server, npz_bytes):
    """A file-size limit (RLIMIT_FSIZE) makes writes fail part-way, as a full disk does."""
    url = f"{server.url}/models/vit.npz"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))\n"
            "from vitlab.cli import main\n"
            "sys.exit(main(['info', sys.argv[1]]))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VITLAB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "cannot write to the download cache" in done.stderr and "Traceback" not in done.stderr
    assert fetch(url).read_bytes() == npz_bytes
    assert server.gets("/models/vit.npz")[-1] == "bytes=300000-"


def test_redirect_loop_is_refused_in_one_line(home, server):
    server.redirects = {"/a.npz": "/b.npz", "/b.npz": "/a.npz"}
    with pytest.raises(VitlabError, match="redirect") as info:
        fetch(f"{server.url}/a.npz")
    assert "\n" not in str(info.value)
    assert _leftovers(home) == []


def test_credentials_in_a_url_are_refused_and_never_shown_or_stored(home, server, capsys):
    from vitlab.cli import main

    url = f"http://alice:s3cr3t-token@{server.url[len('http://'):]}/models/vit.npz"
    with pytest.raises(VitlabError, match="user name or password in the URL is refused") as info:
        fetch(url)
    assert "s3cr3t" not in str(info.value) and "alice" not in str(info.value)
    assert main(["info", url]) == 2
    assert "s3cr3t" not in capsys.readouterr().err
    assert not home.exists() or not [p for p in home.rglob("*") if "s3cr3t" in str(p)]
    assert server.requests == []


def test_final_name_linked_to_a_missing_file_is_replaced_not_written_through(home, server, npz_bytes, tmp_path):
    url = f"{server.url}/models/vit.npz"
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.symlink_to(outside / "created-through-the-link")
    assert fetch(url).read_bytes() == npz_bytes
    assert not dest.is_symlink() and list(outside.iterdir()) == []

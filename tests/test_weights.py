"""Weights by name: "default", "official" (a real download from a server on 127.0.0.1,
hash-checked), "hf://" and paths; the factories' and models' weights= argument."""
from __future__ import annotations

import hashlib
import http.server
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastsr
from fastsr import cli
import fastsr.weights as weights
from fastsr.checkpoints import model_from_checkpoint, read_checkpoint
from fastsr.errors import CheckpointError


class _Server:
    """A static file server on 127.0.0.1 that counts the GET requests per path."""

    def __init__(self, folder: Path):
        counts: dict[str, int] = {}

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def do_GET(self):
                counts[self.path] = counts.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *a):  # quiet test output
                pass

        self.counts = counts
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A small official-layout file (r1f8x2) served as the release, its name carrying the
    SHA-256 prefix of its bytes like the real files do; TORCH_HOME in a temporary folder."""
    served = tmp_path / "www" / "models"
    served.mkdir(parents=True)
    model = fastsr.EDSR(2, n_resblocks=1, n_feats=8)
    torch.manual_seed(1)
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    sd["sub_mean.weight"], sd["sub_mean.bias"] = model.sub_mean.weight, model.sub_mean.bias  # 0..255 shift
    sd["add_mean.weight"], sd["add_mean.bias"] = model.add_mean.weight, model.add_mean.bias
    tmp_file = served / "tmp.pt"
    torch.save(sd, tmp_file)
    name = f"edsr_tiny_x2-{hashlib.sha256(tmp_file.read_bytes()).hexdigest()[:8]}.pt"
    tmp_file.rename(served / name)
    server = _Server(tmp_path / "www")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("FASTSR_WEIGHTS_URL", server.url)
    monkeypatch.setitem(weights.OFFICIAL_FILES, "r1f8x2", name)
    yield types.SimpleNamespace(sd=sd, name=name, server=server, served=served,
                                cache=tmp_path / "torch_home" / "hub" / "checkpoints")
    server.close()


def test_official_weights_download_once_into_the_hub_cache(release):
    model = fastsr.EDSR(2, n_resblocks=1, n_feats=8, weights="official")
    for key, value in model.state_dict().items():
        assert torch.equal(value, release.sd[key]), key
    assert (release.cache / release.name).is_file()
    fastsr.EDSR(2, n_resblocks=1, n_feats=8, fused=True, weights="official")  # from the cache
    assert release.server.counts == {f"/models/{release.name}": 1}
    assert not list(release.cache.glob("*.partial"))


def test_a_corrupted_download_is_refused_and_leaves_nothing(release):
    path = release.served / release.name
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte: still the right size and name
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="refused: the downloaded file fails its SHA-256 check"):
        fastsr.EDSR(2, n_resblocks=1, n_feats=8, weights="official")
    assert not release.cache.exists() or not list(release.cache.iterdir())


def test_a_damaged_cached_file_is_downloaded_again(release):
    first = weights.official_weights("r1f8x2")
    first.write_bytes(first.read_bytes()[:-10])  # truncated in the cache
    again = weights.official_weights("r1f8x2")
    assert again == first and read_checkpoint(again)[0].keys() == release.sd.keys()
    assert release.server.counts[f"/models/{release.name}"] == 2


def test_offline_and_missing_files_say_what_to_do(release, monkeypatch):
    monkeypatch.setitem(weights.OFFICIAL_FILES, "r1f8x2", "edsr_tiny_x2-00000000.pt")
    with pytest.raises(CheckpointError, match=r"server answered 404"):
        weights.official_weights("r1f8x2")
    release.server.close()
    with pytest.raises(CheckpointError, match=r"no network or server unreachable .*pass the file"):
        weights.official_weights("r1f8x2")


def test_default_is_the_shipped_file_and_other_words_are_checked():
    shipped = weights.default_weights(2)
    model = fastsr.edsr_baseline(2, weights="default")
    for key, value in model_from_checkpoint(shipped).state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(fastsr.edsr_baseline(2, weights=shipped).head[0].weight, model.head[0].weight)  # a path
    with pytest.raises(CheckpointError, match="ships EDSR-baseline x2/x3/x4 weights only, not r32f256x2"):
        fastsr.edsr(2, weights="default")
    with pytest.raises(CheckpointError, match="released no weights for r2f8x2"):
        fastsr.EDSR(2, 2, 8, weights="official")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        fastsr.edsr_baseline(2, weights="defualt")  # a typo is a path that does not exist
    with pytest.raises(TypeError, match="weights must be None"):
        fastsr.edsr_baseline(2, weights=True)
    with pytest.raises(CheckpointError, match="does not match the model"):
        fastsr.edsr_baseline(4, weights=shipped)  # x2 weights into an x4 model


def test_every_official_name_carries_a_hash_prefix():
    for arch, name in weights.OFFICIAL_FILES.items():
        prefix = weights._hash_prefix(name)
        assert len(prefix) == 8 and int(prefix, 16) >= 0, name
    assert weights.official_url("r16f64x2").endswith("/edsr_baseline_x2-1bc95232.pt")


def test_hf_weights_need_the_extra_and_pick_the_one_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    with pytest.raises(CheckpointError, match=r"needs huggingface_hub: pip install 'fastsr\[hub\]'"):
        fastsr.edsr_baseline(2, weights="hf://someone/edsr")
    local = weights.default_weights(2)
    calls = []
    fake = types.SimpleNamespace(
        list_repo_files=lambda repo: ["README.md", "edsr_baseline_x2.safetensors"],
        hf_hub_download=lambda repo, name: calls.append((repo, name)) or str(local),
    )
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    fastsr.edsr_baseline(2, weights="hf://someone/edsr")
    fastsr.edsr_baseline(2, weights="hf://someone/edsr/sub/x2.safetensors")
    assert calls == [("someone/edsr", "edsr_baseline_x2.safetensors"), ("someone/edsr", "sub/x2.safetensors")]
    fake.list_repo_files = lambda repo: ["a.pt", "b.safetensors"]
    with pytest.raises(CheckpointError, match=r"name the file \(hf://someone/edsr/FILE\).*a.pt, b.safetensors"):
        fastsr.edsr_baseline(2, weights="hf://someone/edsr")

    def offline(repo, name):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    fake.hf_hub_download = offline
    with pytest.raises(CheckpointError, match="could not get it from the Hugging Face Hub .*couldn't connect"):
        fastsr.edsr_baseline(2, weights="hf://someone/edsr/x.pt")
    with pytest.raises(CheckpointError, match="expected hf://owner/repo"):
        fastsr.edsr_baseline(2, weights="hf://justone")


def test_cli_weights_words_and_the_files_own_scale(tmp_path, monkeypatch, capsys):
    """--weights official downloads (from the local server) what --model and --scale name;
    without --scale a weights file's own scale is used, and MDSR files must be told."""
    served = tmp_path / "www" / "models"
    served.mkdir(parents=True)
    torch.manual_seed(2)
    model = fastsr.edsr_baseline(3)
    torch.save(model.state_dict(), served / "x3.pt")
    name = f"edsr_baseline_x3-{hashlib.sha256((served / 'x3.pt').read_bytes()).hexdigest()[:8]}.pt"
    (served / "x3.pt").rename(served / name)
    server = _Server(tmp_path / "www")
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        monkeypatch.setenv("FASTSR_WEIGHTS_URL", server.url)
        monkeypatch.setitem(weights.OFFICIAL_FILES, "r16f64x3", name)
        src = tmp_path / "a.png"
        PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(src)
        out = tmp_path / "o"
        assert cli.main(["upscale", str(src), "-o", str(out), "-s", "3", "-w", "official"]) == 0
        assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o2"), "-w", str(weights.default_weights(2))]) == 0
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "r16f64x3 from " in err and name in err
    assert PILImage.open(out / "a_x3.png").size == (21, 27)
    assert PILImage.open(tmp_path / "o2" / "a_x2.png").size == (14, 18)  # x2: the file's scale

    mdsr = fastsr.checkpoints.save_safetensors(fastsr.MDSR((2, 4), 1, 8), tmp_path / "m.safetensors")
    assert cli.main(["upscale", str(src), "-o", str(out), "-w", str(mdsr)]) == 1
    assert cli.main(["upscale", str(src), "-o", str(out), "-w", "official"]) == 1
    assert cli.main(["upscale", str(src), "-o", str(out), "-s", "2", "-w", "default", "--model", "edsr"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 3, errors
    assert "an MDSR with scales 2, 4: pass --scale" in errors[0]
    assert "--weights official needs --scale" in errors[1]
    assert "ships EDSR-baseline x2/x3/x4 weights only, not r32f256x2" in errors[2]

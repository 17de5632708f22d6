"""The openvino backend (CPU inference): parity, caching, and the whole-model choice.

Run by tests/test_openvino.py in a child pytest process of their own (see there why); by
hand: `python -m pytest -q tests/openvino_cases.py`."""
from __future__ import annotations

import pytest
import torch

import fastsr
from fastsr.errors import BackendUnavailable
from fastsr.ops import dispatch
from fastsr.ops.backends.openvino import openvino_forward
from testenv import shared_set

pytest.importorskip("openvino")


@pytest.fixture
def measured(monkeypatch):
    """The measured choice on (tests pin it: testenv), with fake timings."""
    monkeypatch.delenv("FASTSR_DETERMINISTIC", raising=False)
    monkeypatch.setenv("FASTSR_PLAN_CACHE", "")  # off: never a default path under $HOME
    dispatch.clear_cache()
    yield
    dispatch.set_timer(None)
    dispatch.clear_cache()


def _pair(**kw):
    torch.manual_seed(0)
    model = fastsr.EDSR(2, n_resblocks=2, n_feats=8, res_scale=0.5, **kw).eval()
    eager = fastsr.EDSR(2, n_resblocks=2, n_feats=8, res_scale=0.5).eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def test_fp32_matches_the_eager_model_and_compiles_once_per_shape():
    model, eager = _pair(backend="openvino")
    runner = openvino_forward(model)
    with torch.no_grad():
        for shape in [(1, 3, 9, 7), (2, 3, 5, 11), (1, 3, 9, 7)]:
            x = torch.rand(*shape) * 255
            out, ref = model(x), eager(x)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * 255)
    assert model.backend == "openvino" and model.plan[0]["implementation"] == "openvino"
    assert len(runner._compiled) == 2 and len(runner._converted) == 1  # per shape; one conversion
    with torch.no_grad():
        model.tail[1].bias.add_(1.0)  # new weights: converted again, never the stale graph
        torch.testing.assert_close(model(x), eager(x) + 1.0, rtol=1e-4, atol=1e-4 * 255)
    assert len(runner._converted) == 1


def test_outputs_are_not_the_requests_buffers_and_any_input_layout_or_dtype_works():
    """The runner writes x into one input buffer per shape and reads the request's output in
    place: each result must be its own tensor (a later call must not rewrite an earlier
    result), and a channels-last or bfloat16 input must give what the NCHW float32 one does."""
    model, eager = _pair(backend="openvino")
    torch.manual_seed(1)
    x1, x2 = torch.rand(1, 3, 9, 7) * 255, torch.rand(1, 3, 9, 7) * 255
    with torch.no_grad():
        out1 = model(x1)
        kept = out1.clone()
        out2 = model(x2)
        torch.testing.assert_close(out1, kept, rtol=0, atol=0)
        torch.testing.assert_close(out2, eager(x2), rtol=1e-4, atol=1e-4 * 255)
        cl = model(x1.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, kept, rtol=0, atol=0)
        xb = x1.to(torch.bfloat16)
        outb = model(xb)
        assert outb.dtype == torch.bfloat16
        # A bf16 input runs OpenVINO in bf16 (the compute dtype is x's): bf16's bound, not bits.
        torch.testing.assert_close(outb.float(), eager(xb.float()), rtol=0.02, atol=3.0)


def test_forced_openvino_refuses_training_and_gradients():
    model, _ = _pair(backend="openvino")
    x = torch.rand(1, 3, 6, 6) * 255
    with pytest.raises(BackendUnavailable, match="CPU inference only"):
        model(x)  # gradients on
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="CPU inference only"):
        model.train()(x)


def test_the_measured_choice_picks_openvino_when_faster_and_never_for_training(measured):
    model, eager = _pair(fused=True)
    x = torch.rand(1, 3, 6, 7) * 255
    dispatch.set_timer(lambda runs: {"fused": 5.0, "openvino": 2.0})
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4 * 255)
    assert model.backend == "openvino" and model.plan[0]["times_ms"] == {"fused": 5.0, "openvino": 2.0}
    out = model.train()(x)  # training: fastsr's fused ops, whatever the timings say
    assert model.backend == "cpu" and out.requires_grad
    model.eval()
    dispatch.clear_cache()
    dispatch.set_timer(lambda runs: {"fused": 1.0, "openvino": 2.0})
    with torch.no_grad():
        model(x)
    assert model.backend == "cpu" and [e["layer"] for e in model.plan][0] == "head.0"
    pinned = fastsr.EDSR(2, 1, 8, backend="cpu").eval()
    dispatch.set_timer(lambda runs: pytest.fail("backend='cpu' is not a choice to time"))
    with torch.no_grad():
        pinned(x)
    assert pinned.backend == "cpu"


def test_bf16_set5_psnr_within_0_05_db_of_fp32():
    """The shipped x2 weights on Set5 through OpenVINO: bf16 (its bf16 inference) against fp32."""
    from fastsr.evaluation import evaluate_image
    from fastsr.imageio import list_images, read_image
    from fastsr.metrics import quantize

    paths = list_images([shared_set("Set5")])
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = fastsr.edsr_baseline(2, weights="default", backend="openvino",
                                     dtype=None if dtype == torch.float32 else dtype).eval()
        with torch.no_grad():
            rows = [evaluate_image(lambda lr: quantize(model(lr.float())), read_image(p).rgb, 2, "paper")
                    for p in paths]
        scores[dtype] = sum(r.psnr for r in rows) / len(rows)
    print(f"Set5 x2 through OpenVINO: fp32 {scores[torch.float32]:.3f} dB, bf16 {scores[torch.bfloat16]:.3f} dB")
    assert scores[torch.float32] > 37.0
    assert abs(scores[torch.bfloat16] - scores[torch.float32]) <= 0.05


def test_a_big_input_is_timed_on_a_bounded_probe_once_for_all_its_sizes(measured):
    model, _ = _pair(fused=True)
    timed = []

    def timer(runs):
        timed.append(sorted(runs))
        return {"fused": 1.0, "openvino": 2.0}

    dispatch.set_timer(timer)
    with torch.no_grad():
        model(torch.rand(1, 3, 300, 20) * 255)
        model(torch.rand(1, 3, 400, 20) * 255)  # both sides past the probe's in H: the same choice
        model(torch.rand(1, 3, 30, 20) * 255)   # a small input: its own
    assert len(timed) == 2 and model.backend == "cpu"
    from fastsr.models.edsr import _PROBE

    sig_keys = [k for k in dispatch._memory if k.startswith("model|")]
    assert any(f"x{_PROBE}x20|" in k for k in sig_keys), sig_keys


def test_whole_model_probe_says_where_timing_is_still_to_come(measured, monkeypatch):
    """Memory planning asks whether a new input's first run will time both engines (their
    working sets are then both on the heap) and at which crop."""
    model, _ = _pair(fused=True)
    dispatch.set_timer(lambda runs: {"fused": 1.0, "openvino": 2.0})
    assert model.whole_model_probe((1, 3, 300, 20), 2) == (1, 3, 256, 20)
    with torch.no_grad():
        model(torch.rand(1, 3, 300, 20) * 255)
    assert model.whole_model_probe((1, 3, 400, 20), 2) is None  # the same probe: chosen already
    assert model.whole_model_probe((1, 3, 30, 20), 2) == (1, 3, 30, 20)
    assert fastsr.EDSR(2, 1, 8, backend="cpu").whole_model_probe((1, 3, 30, 20), 2) is None  # forced
    assert fastsr.EDSR(2, 1, 8).whole_model_probe((1, 3, 30, 20), 2) is None  # eager
    monkeypatch.setenv("FASTSR_DETERMINISTIC", "1")
    assert model.whole_model_probe((1, 3, 30, 20), 2) is None  # pinned: nothing is timed


def test_clear_compiled_drops_every_shape_and_keeps_the_conversion():
    model, eager = _pair(backend="openvino")
    runner = openvino_forward(model)
    x = torch.rand(1, 3, 9, 7) * 255
    with torch.no_grad():
        model(x)
        model(torch.rand(1, 3, 5, 6) * 255)
        assert len(runner._compiled) == 2
        runner.clear_compiled()
        assert not runner._compiled and len(runner._converted) == 1
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4 * 255)  # compiled again
    assert len(runner._compiled) == 1
    from fastsr.inference import Upscaler

    up = Upscaler(model, "test", torch.device("cpu"), torch.float32, 2)
    up(x)
    up.release_shape_caches()  # what --max-memory does between images of different sizes
    assert not runner._compiled


def test_converted_graphs_are_kept_on_disk_by_the_weights_bytes(tmp_path, monkeypatch):
    import openvino as ov

    from fastsr.ops.backends import openvino as ov_backend

    monkeypatch.setenv("FASTSR_OPENVINO_CACHE", str(tmp_path / "ir"))
    conversions = []
    real = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: conversions.append(1) or real(*a, **k))
    x = torch.rand(1, 3, 6, 5) * 255
    first, eager = _pair(backend="openvino")
    with torch.no_grad():
        want = eager(x)
        torch.testing.assert_close(first(x), want, rtol=1e-4, atol=1e-4 * 255)
        assert len(conversions) == 1 and len(list((tmp_path / "ir").glob("*.xml"))) == 1
        again, _ = _pair(backend="openvino")  # a new model object, the same weights: read from disk
        torch.testing.assert_close(again(x), want, rtol=1e-4, atol=1e-4 * 255)
        assert len(conversions) == 1
        again.tail[1].bias.add_(1.0)  # other weights: another file
        torch.testing.assert_close(again(x), want + 1.0, rtol=1e-4, atol=1e-4 * 255)
    assert len(conversions) == 2 and len(list((tmp_path / "ir").glob("*.xml"))) == 2
    assert not list((tmp_path / "ir").glob(".*"))  # no temporary files left
    for binary in (tmp_path / "ir").glob("*.bin"):
        binary.write_bytes(b"damaged")  # truncated weights: refused by OpenVINO, converted again
    third, _ = _pair(backend="openvino")
    with torch.no_grad():
        torch.testing.assert_close(third(x), want, rtol=1e-4, atol=1e-4 * 255)
    assert len(conversions) == 3
    monkeypatch.setenv("FASTSR_OPENVINO_CACHE", "")
    assert ov_backend.ir_cache_dir() is None


def test_a_channels_last_model_converts_and_shares_the_cache_key():
    """model.to(memory_format=channels_last) (as users and bench/run.py do) makes the (3, 3, 1, 1)
    mean weights "contiguous" with a non-unit last stride: the weights' digest must still read
    their bytes, and give the key of the same model in the usual layout."""
    from fastsr.ops.backends.openvino import _graph_digest

    model, eager = _pair(backend="openvino")
    key = _graph_digest(model, 0)
    model = model.to(memory_format=torch.channels_last)
    assert model.sub_mean.weight.stride(-1) != 1  # the case itself
    assert _graph_digest(model, 0) == key
    x = (torch.rand(1, 3, 6, 5) * 255).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4 * 255)

"""The eager models: published sizes, official key names, shapes, scale handling."""
import pytest
import torch

import fastsr
from fastsr.models import EDSR, MDSR, count_parameters

# Published parameter counts (paper / official release), in millions, and our exact counts.
PUBLISHED = [
    (lambda: fastsr.edsr_baseline(2), 1.37),
    (lambda: fastsr.edsr_baseline(3), 1.55),
    (lambda: fastsr.edsr_baseline(4), 1.52),
    (lambda: fastsr.edsr(2), 40.7),
    (lambda: fastsr.edsr(3), 43.7),
    (lambda: fastsr.edsr(4), 43.1),
    (lambda: fastsr.mdsr_baseline(), 3.23),
    (lambda: fastsr.mdsr(), 7.95),
]


@pytest.mark.parametrize("build,millions", PUBLISHED)
def test_parameter_counts_match_the_paper(build, millions):
    n = count_parameters(build())
    assert round(n / 1e6, 2 if millions < 10 else 1) == millions


def test_edsr_key_layout_is_official():
    keys = set(fastsr.edsr_baseline(4).state_dict())
    for k in ["sub_mean.weight", "sub_mean.bias", "add_mean.bias", "head.0.weight", "body.0.body.0.weight",
              "body.15.body.2.bias", "body.16.weight", "tail.0.0.weight", "tail.0.2.weight", "tail.1.weight"]:
        assert k in keys, k
    assert "body.17.weight" not in keys


def test_mdsr_key_layout_is_official():
    sd = fastsr.mdsr_baseline().state_dict()
    assert sd["pre_process.2.1.body.2.weight"].shape == (64, 64, 5, 5)
    assert sd["upsample.1.0.weight"].shape == (9 * 64, 64, 3, 3)
    assert sd["upsample.2.2.weight"].shape == (4 * 64, 64, 3, 3)
    assert sd["tail.0.weight"].shape == (3, 64, 3, 3)


def test_mean_shift_uses_rgb_range():
    m = EDSR(2, 1, 8, rgb_range=1.0)
    assert torch.allclose(m.sub_mean.bias, -torch.tensor([0.4488, 0.4371, 0.4040]))
    assert not any(p.requires_grad for p in m.sub_mean.parameters())


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shapes(scale):
    x = torch.rand(2, 3, 7, 9) * 255
    assert EDSR(scale, 2, 8)(x).shape == (2, 3, 7 * scale, 9 * scale)
    assert MDSR((2, 3, 4), 2, 8)(x, scale=scale).shape == (2, 3, 7 * scale, 9 * scale)


def test_mdsr_runs_only_the_selected_branch():
    m = MDSR((2, 3, 4), 1, 8)
    x = torch.rand(1, 3, 5, 5) * 255
    m(x, scale=3).sum().backward()
    assert m.pre_process[1][0].body[0].weight.grad is not None
    assert m.pre_process[0][0].body[0].weight.grad is None
    assert m.upsample[2][0].weight.grad is None


def test_eager_matches_a_hand_written_forward():
    torch.manual_seed(0)
    m = EDSR(2, 2, 8, res_scale=0.5)
    x = torch.rand(1, 3, 6, 5) * 255
    conv = lambda c, t: torch.nn.functional.conv2d(t, c.weight, c.bias, padding=c.weight.shape[-1] // 2)
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1) * 255
    h = conv(m.head[0], x - mean)
    r = h
    for blk in m.body[:-1]:
        r = r + 0.5 * conv(blk.body[2], torch.relu(conv(blk.body[0], r)))
    r = conv(m.body[-1], r) + h
    y = conv(m.tail[1], torch.pixel_shuffle(conv(m.tail[0][0], r), 2)) + mean
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bad", [1, 5, 6, 16, 2.5, "2", True])
def test_unsupported_scale_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="scale must be one of"):
        EDSR(bad, 1, 8)


def test_bad_input_is_a_clear_error():
    m = EDSR(2, 1, 8)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="MDSR needs"):
        MDSR((2,), 1, 8)(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="built for scale 2"):
        m(torch.rand(1, 3, 4, 4), scale=4)


def test_eager_model_reports_its_backend():
    m = EDSR(2, 1, 8)
    m(torch.rand(1, 3, 4, 4))
    assert m.backend == "eager"


def test_backend_is_known_before_the_first_call():
    assert EDSR(2, 1, 8).backend == "eager"
    fused = EDSR(2, 1, 8, fused=True)
    assert fused.backend == "cpu"  # what a CPU tensor gets, before any call
    fused(torch.rand(1, 3, 5, 4) * 255)
    assert fused.backend == "cpu"
    assert EDSR(2, 1, 8, backend="reference").backend == "reference"
    assert MDSR((2, 3), 1, 8, fused=True).backend == "cpu"


def test_0_to_1_input_to_a_0_to_255_model_warns_once():
    m = EDSR(2, 1, 8)
    with pytest.warns(UserWarning, match=r"takes 0\.\.255 input and got values in 0\.\.1: .*input_range=1"):
        m(torch.rand(1, 3, 6, 5))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.rand(1, 3, 6, 5))  # once per model
        EDSR(2, 1, 8)(torch.rand(1, 3, 6, 5) * 255)  # 0..255: nothing to say
        EDSR(2, 1, 8, rgb_range=1.0)(torch.rand(1, 3, 6, 5))  # a 0..1 model
        EDSR(2, 1, 8, input_range=1)(torch.rand(1, 3, 6, 5))  # 0..255 weights told to take 0..1


@pytest.mark.parametrize("fused", [False, True])
def test_input_range_runs_0_to_255_weights_on_0_to_1_tensors(fused):
    torch.manual_seed(0)
    ref = MDSR((2, 3), 1, 8).eval()
    unit = MDSR((2, 3), 1, 8, input_range=1, fused=fused).eval()
    unit.load_state_dict(ref.state_dict())  # same 0..255 weights: input_range is not a weight
    x = torch.rand(2, 3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(unit(x, scale=3), ref(x * 255, scale=3) / 255, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_range must be a positive number"):
        EDSR(2, 1, 8, input_range=0)


def test_forward_and_factories_document_their_contract():
    assert "0..input_range" in EDSR.forward.__doc__ and "(N, 3, scale*H, scale*W)" in EDSR.forward.__doc__
    assert "scale: required" in MDSR.forward.__doc__
    for factory in (fastsr.edsr_baseline, fastsr.edsr, fastsr.mdsr_baseline, fastsr.mdsr):
        assert all(word in factory.__doc__ for word in ("fused=True", "backend=", "dtype=", "recompute=", "weights=",
                                                        "input_range")), factory

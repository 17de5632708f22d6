"""The whole EDSR/MDSR forward with fused=True equals the eager model."""
import pytest
import torch

import fastsr
from fastsr.errors import BackendUnavailable
from fastsr.ops.dispatch import unsupported_reasons


def tiny_models():
    torch.manual_seed(0)
    return [
        ("edsr_x2_rs0.1", fastsr.EDSR(2, 2, 16, res_scale=0.1), 2),
        ("edsr_x3", fastsr.EDSR(3, 1, 16), 3),
        ("edsr_x4", fastsr.EDSR(4, 1, 8), 4),
        ("edsr_x8", fastsr.EDSR(8, 1, 8), 8),  # three shuffle stages, as the official x8 files
        ("mdsr_x3", fastsr.MDSR((2, 3, 4), 1, 8), 3),
    ]


def eager_and_fused(model, x, scale, **fused_kw):
    model.fused, model.backend_request, model.compute_dtype = False, None, None
    with torch.no_grad():
        ref = model(x, scale=scale)
        model.fused = True
        model.backend_request = fused_kw.get("backend")
        model.compute_dtype = fused_kw.get("dtype")
        out = model(x, scale=scale)
    return ref, out


@pytest.mark.parametrize("name,model,scale", tiny_models(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_forward_equals_eager(name, model, scale, backend):
    x = torch.rand(2 if backend == "cpu" else 1, 3, 7, 5) * 255
    if unsupported_reasons(backend, x):
        pytest.skip("; ".join(unsupported_reasons(backend, x)))
    ref, out = eager_and_fused(model, x, scale, backend=backend)
    assert model.backend == backend
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_compute_stays_close(dtype):
    """bf16/fp16 compute with fp32 image in/out: error within 2x eager's own + atol."""
    torch.manual_seed(1)
    model = fastsr.EDSR(2, 2, 16, res_scale=0.1)
    x = torch.rand(1, 3, 9, 7) * 255
    ref, out = eager_and_fused(model, x, 2, dtype=dtype)
    assert out.dtype == torch.float32 and model.backend == "cpu"
    with torch.no_grad():
        model.fused = False
        m_low = fastsr.EDSR(2, 2, 16, res_scale=0.1).to(dtype)
        m_low.load_state_dict(model.state_dict())
        eager_low = m_low(x.to(dtype)).float()
    err, eager_err = (out - ref).abs().max().item(), (eager_low - ref).abs().max().item()
    assert err <= 2 * eager_err + 0.05, (err, eager_err)


def test_auto_backend_on_cpu_is_cpu_and_reported():
    model = fastsr.EDSR(2, 1, 8, fused=True)
    model(torch.rand(1, 3, 4, 4) * 255)
    assert model.backend == "cpu"


def test_reference_backend_runs_by_name():
    model = fastsr.EDSR(2, 1, 8, backend="reference")
    ref, out = eager_and_fused(model, torch.rand(1, 3, 5, 6) * 255, 2, backend="reference")
    assert model.backend == "reference"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)


def test_named_backend_that_cannot_run_fails_loudly(monkeypatch):
    model = fastsr.EDSR(2, 1, 8, backend="triton")  # built where it can run (the interpreter is on)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        model(torch.rand(1, 3, 4, 4))
    if not torch.cuda.is_available():  # built where it cannot: fails at construction, not at the first call
        with pytest.raises(BackendUnavailable, match="cannot run on this machine: no CUDA device"):
            fastsr.EDSR(2, 1, 8, backend="triton")
        with pytest.raises(BackendUnavailable, match="no CUDA device"):
            fastsr.edsr_baseline(2, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastsr.EDSR(2, 1, 8, backend="cudnn")
    with pytest.raises(ValueError, match="pass fused=True"):
        fastsr.EDSR(2, 1, 8, dtype=torch.bfloat16)


def test_no_stale_weights_after_an_update():
    model = fastsr.EDSR(2, 1, 8, fused=True).eval()
    x = torch.rand(1, 3, 6, 6) * 255
    model.prepare_for_inference()
    with torch.no_grad():
        before = model(x)
        model.tail[1].bias.add_(1.0)  # an in-place update, as an optimizer step does
        after = model(x)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-5, atol=1e-3)
    model.load_state_dict(fastsr.EDSR(2, 1, 8).state_dict())
    with torch.no_grad():
        model.fused = False
        ref = model(x)
        model.fused = True
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-3)


def test_training_through_the_fused_ops_matches_eager_gradients():
    torch.manual_seed(2)
    eager = fastsr.EDSR(2, 2, 8, res_scale=0.5)
    fused = fastsr.EDSR(2, 2, 8, res_scale=0.5, fused=True)
    fused.load_state_dict(eager.state_dict())
    x, y = torch.rand(2, 3, 6, 6) * 255, torch.rand(2, 3, 12, 12) * 255
    for m in (eager, fused):
        (m(x) - y).abs().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_torch_compile_runs_the_fused_model():
    model = fastsr.EDSR(2, 1, 8, fused=True).eval()
    x = torch.rand(1, 3, 6, 5) * 255
    compiled = torch.compile(model, fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-3)

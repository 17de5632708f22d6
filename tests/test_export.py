"""ONNX export: a fused model exports the eager graph of its weights; ONNX Runtime runs it."""
from __future__ import annotations

import pytest
import torch

import fastsr
from fastsr.errors import FastSRError
from fastsr.export import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["sr"], {"image": x.numpy()})[0])


@pytest.mark.parametrize("fused", [False, True])
def test_edsr_exports_with_dynamic_batch_and_size(tmp_path, fused):
    torch.manual_seed(0)
    model = fastsr.EDSR(3, n_resblocks=2, n_feats=8, res_scale=0.5, fused=fused)
    path = export_onnx(model, tmp_path / "edsr.onnx")
    eager = fastsr.EDSR(3, n_resblocks=2, n_feats=8, res_scale=0.5).eval()
    eager.load_state_dict(model.state_dict())
    for shape in [(1, 3, 7, 9), (3, 3, 16, 5)]:  # neither is the traced example's (2, 3, 32, 40)
        x = torch.rand(*shape) * 255
        with torch.no_grad():
            ref = eager(x)
        out = _run(path, x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_mdsr_exports_one_scale_and_the_fused_model_has_no_custom_ops(tmp_path):
    import onnx

    torch.manual_seed(1)
    model = fastsr.MDSR((2, 4), n_resblocks=1, n_feats=8, fused=True)
    with pytest.raises(FastSRError, match="pass scale="):
        export_onnx(model, tmp_path / "m.onnx")
    path = export_onnx(model, tmp_path / "m.onnx", scale=4)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and domains <= {"", "ai.onnx"}, (ops, domains)  # standard ops only
    x = torch.rand(2, 3, 6, 11) * 255
    with torch.no_grad():
        ref = model(x, scale=4)
    torch.testing.assert_close(_run(path, x), ref, rtol=1e-5, atol=1e-3)
    assert model.backend != "eager"  # export did not leave the model switched to eager


def test_torch_onnx_export_of_a_fused_model_uses_the_eager_graph(tmp_path):
    model = fastsr.EDSR(2, n_resblocks=1, n_feats=8, fused=True).eval()
    x = torch.rand(2, 3, 10, 12) * 255
    torch.onnx.export(model, (x,), str(tmp_path / "plain.onnx"), dynamo=True, input_names=["image"],
                      output_names=["sr"])
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "plain.onnx", x), model(x), rtol=1e-5, atol=1e-3)


def test_export_command_writes_a_file_that_runs(tmp_path, capsys):
    from fastsr import cli
    from fastsr.checkpoints import model_from_checkpoint, save_safetensors

    torch.manual_seed(3)
    weights = save_safetensors(fastsr.EDSR(4, 1, 8), tmp_path / "w.safetensors")
    out = tmp_path / "out" / "m.onnx"
    assert cli.main(["export", str(weights), "--onnx", str(out)]) == 0
    assert "wrote " in capsys.readouterr().err
    x = torch.rand(1, 3, 5, 6) * 255
    with torch.no_grad():
        ref = model_from_checkpoint(weights).eval()(x)
    torch.testing.assert_close(_run(out, x), ref, rtol=1e-5, atol=1e-3)
    assert cli.main(["export", str(weights), "--onnx", str(out), "--scale", "2"]) == 1
    assert cli.main(["export", str(tmp_path / "none.pt"), "--onnx", str(out)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "this EDSR is x4, scale=2 was asked for" in errors[0] and "no such checkpoint file" in errors[1]

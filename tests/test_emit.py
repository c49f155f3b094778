"""Emitters: model dir, ONNX (checked, dynamic axes, ORT parity) and .pt2; atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import mptc
from mptc.export import ONNX_OPSET, run_onnx

from .conftest import TINY, TINY_IDS


@pytest.fixture(scope="module", params=TINY, ids=TINY_IDS)
def compiled(request, tmp_path_factory):
    """A tiny example compiled once to a model dir, an ONNX file and a .pt2 program."""
    out = tmp_path_factory.mktemp(request.param.stem)
    model = mptc.build(mptc.load(request.param), seed=0).eval()
    mptc.save(model, out / "model")
    mptc.export_onnx(model, out / "model.onnx")
    mptc.export_pt2(model, out / "model.pt2")
    return model, out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [5, 13])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_onnx_runtime_matches_pytorch(compiled, batch, seq, padded):
    model, out = compiled
    x = mptc.example_inputs(mptc.spec_of(model), batch=batch, seq=seq, seed=batch + seq, padded=padded)
    if padded and "attention_mask" in x:
        assert (x["attention_mask"] == 0).any()
    with torch.no_grad():
        ref = model(**x).numpy()
    got = run_onnx(out / "model.onnx", x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_onnx_file_is_checked_and_named_like_hugging_face(compiled):
    model, out = compiled
    spec = mptc.spec_of(model)
    m = onnx.load(out / "model.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == ONNX_OPSET == 23
    assert [i.name for i in m.graph.input] == list(spec.inputs)
    assert [o.name for o in m.graph.output] == [spec.output]
    first = m.graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param  # batch is symbolic
    if spec.patches is None:
        assert first[1].dim_param  # sequence is symbolic


@pytest.mark.parametrize("name,fused", [("tiny-llama", {"Attention", "RMSNormalization"}),
                                        ("tiny-gpt2", {"Attention"})])
@pytest.mark.parametrize("opset", [18, 23])
def test_opsets_fuse_attention_and_norms_where_they_can(name, fused, opset, tmp_path):
    """Opset 23 has Attention and RMSNormalization ops; opset 18 gets their decomposed forms."""
    model = mptc.build(mptc.load(f"tests/specs/{name}.mpt"), seed=0).eval()
    mptc.export_onnx(model, tmp_path / "m.onnx", opset=opset)
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert (fused <= ops) == (opset >= 23) and not (fused & ops and opset < 23)
    assert ("Softmax" in ops) == (opset < 23)
    x = mptc.example_inputs(mptc.spec_of(model), batch=3, seq=11, seed=2, padded=True)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), model(**x).numpy(), rtol=1e-4, atol=1e-4)


def test_pt2_program_matches(compiled):
    model, out = compiled
    ep = torch.export.load(str(out / "model.pt2"))
    x = mptc.example_inputs(mptc.spec_of(model), batch=3, seq=7, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**x), model(**x), rtol=1e-5, atol=1e-5)


def test_model_dir_round_trips(compiled):
    model, out = compiled
    assert sorted(p.name for p in (out / "model").iterdir()) == ["model.mpt", "weights.safetensors"]
    again = mptc.load_model(out / "model").eval()
    assert mptc.spec_of(again) == mptc.spec_of(model)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(again(**x), model(**x), rtol=0, atol=0)


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path):
    a = mptc.build(mptc.load("tests/specs/tiny-gpt2.mpt"))
    mptc.save(a, tmp_path / "a")
    other = mptc.load("tests/specs/tiny-bert.mpt")
    with pytest.raises(mptc.MptcError, match="does not fit the spec"):
        mptc.build(other, weights=tmp_path / "a")
    wider = mptc.spec_of(a).replace(width=96)
    with pytest.raises(mptc.MptcError, match=r"'embed.tokens.weight' has shape \(1000, 64\), the spec needs "
                       r"\(1000, 96\)"):
        mptc.build(wider, weights=tmp_path / "a")


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    model = mptc.build(mptc.load("tests/specs/tiny-vit.mpt")).eval()

    def broken(*a, **k):
        raise onnx.checker.ValidationError("broken on purpose")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    dest = tmp_path / "vit.onnx"
    dest.write_bytes(b"previous")
    with pytest.raises(mptc.MptcError, match="fails onnx.checker: broken on purpose"):
        mptc.export_onnx(model, dest)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]


def test_failed_save_keeps_the_old_model_dir(tmp_path, monkeypatch):
    import mptc.model as M

    model = mptc.build(mptc.load("tests/specs/tiny-vit.mpt"))
    mptc.save(model, tmp_path / "m")
    before = (tmp_path / "m" / "weights.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(M, "save_file", broken)
    with pytest.raises(OSError):
        mptc.save(mptc.build(mptc.load("tests/specs/tiny-vit.mpt"), seed=3), tmp_path / "m")
    assert (tmp_path / "m" / "weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_half_precision_compiles(tmp_path):
    model = mptc.load_model("tests/specs/tiny-llama.mpt", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    mptc.save(model, tmp_path / "bf16")
    again = mptc.load_model(tmp_path / "bf16", dtype="bfloat16")
    x = mptc.example_inputs(mptc.spec_of(model), batch=1, seq=4)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**x), model.eval()(**x), rtol=0, atol=0)

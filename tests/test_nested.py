"""MatFormer: sub-networks inside the compiled module, extraction, Mix'n'Match, reordering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mptc
from mptc import passes as P
from mptc.choice import level_names, parse_choice
from mptc.cli import main
from mptc.nested import granularity

SPECS = Path(__file__).parent / "specs"
ROOT = Path(__file__).resolve().parent.parent
# every nested spec: the tiny test ones and the shipped examples that declare nesting
NESTED = sorted(SPECS.glob("nested-*.mpt")) + [p for p in sorted((ROOT / "examples").glob("*.mpt"))
                                               if mptc.load(p).nested]


def _model(path):
    return mptc.build(mptc.load(path), seed=0).eval()


def _choices(spec):
    """Uniform, Mix'n'Match, heads, and with skipped layers, for a nested spec."""
    n = spec.n_layers
    mlp_names = level_names(next(ly.mlp.nested for ly in spec.layers if ly.mlp.nested))
    head_levels = next((ly.attention.nested for ly in spec.layers if ly.attention.nested), None)
    skippable = [i for i, ly in enumerate(spec.layers) if ly.skippable]
    mix = ",".join(mlp_names[i % len(mlp_names)] for i in range(n))
    out = [dict(mlp=mlp_names[0]), dict(mix=mix)]
    if head_levels:
        out.append(dict(heads=level_names(head_levels)[0]))
        out.append(dict(mix=mix, heads=level_names(head_levels)[0], drop_layers=skippable[:1]))
    if skippable:
        out.append(dict(mlp=mlp_names[1], drop_layers=skippable))
    return out


@pytest.mark.parametrize("path", NESTED, ids=[p.stem for p in NESTED])
def test_extraction_equals_the_parent_at_that_granularity(path):
    model = _model(path)
    spec = mptc.spec_of(model)
    for kw in _choices(spec):
        sub, report = P.Pipeline([P.extract(**kw)])(model)
        r = report.passes[0]
        assert r.max_abs_error_float32 <= 1e-6 and r.params_after < r.params_before, kw
        # independently of the pipeline's check
        x = mptc.example_inputs(spec, batch=2, seq=9, seed=4, padded=True)
        with torch.no_grad(), granularity(model, kw.get("mix"), mlp=kw.get("mlp"), heads=kw.get("heads"),
                                          skip=kw.get("drop_layers") or ()):
            want = model(**x)
        with torch.no_grad():
            got = sub(**x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # the physically smaller model's size is what its spec says
        assert mptc.summarize(mptc.spec_of(sub)).params == sum(p.numel() for p in sub.parameters())


def test_granularity_context_restores_and_shares_weights():
    model = _model(SPECS / "nested-lm.mpt")
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8)
    with torch.no_grad():
        full = model(**x)
        with granularity(model, mlp="s"):
            small = model(**x)
        again = model(**x)
    assert (full - small).abs().max() > 1e-4
    torch.testing.assert_close(again, full, rtol=0, atol=0)
    # training through a sub-network updates the shared parameters' prefix only
    model.train()
    with granularity(model, mlp="s"):
        model(**x).sum().backward()
    g = model.get_parameter("layers.0.mlp.up.weight").grad
    assert g[:8].abs().sum() > 0 and g[8:].abs().sum() == 0


def test_extracted_model_keeps_its_inner_nesting_and_can_be_cut_again():
    model = _model(SPECS / "nested-lm.mpt")
    half, _ = P.Pipeline([P.extract(mlp="l")])(model)
    spec = mptc.spec_of(half)
    assert spec.layers[0].mlp.hidden == 32 and spec.layers[0].mlp.nested == (0.25, 0.5, 1.0)
    quarter, _ = P.Pipeline([P.extract(mlp="l")])(half)  # l of the half model = m of the parent
    direct, _ = P.Pipeline([P.extract(mlp="m")])(model)
    torch.testing.assert_close(quarter.state_dict(), direct.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("kw,msg", [
    (dict(mlp="xs"), "unknown granularity 'xs' for layer 0"),
    (dict(mlp="0.3"), "granularity 0.3 is not one of layer 0's nested MLP levels"),
    (dict(mix="s,m"), "the mix lists 2 granularities but the model has 4 layers"),
    (dict(drop_layers=[0, 1, 2, 3]), "cannot drop every layer"),
    (dict(drop_layers=[9]), "cannot drop layer 9"),
    (dict(mlp="xl"), "this choice is the whole model"),
])
def test_bad_choices_are_refused(kw, msg):
    with pytest.raises(mptc.MptcError, match=msg):
        P.Pipeline([P.extract(**kw)])(_model(SPECS / "nested-lm.mpt"))


def test_paper_names_and_fractions_agree():
    spec = mptc.load(SPECS / "nested-lm.mpt")
    assert level_names((0.125, 0.25, 0.5, 1.0)) == ("s", "m", "l", "xl")
    assert parse_choice(spec, "s,1/4,0.5,xl") == parse_choice(spec, "s,m,l,xl")
    assert parse_choice(spec, mlp="s").mlp == (0.125,) * 4


def test_reorder_preserves_function_and_ranks_a_known_case():
    model = _model(SPECS / "nested-lm.mpt")
    spec = mptc.spec_of(model)
    with torch.no_grad():  # make MLP units 40, 7 and 63 of layer 1 by far the largest, in that order
        for unit, scale in ((40, 30.0), (7, 20.0), (63, 10.0)):
            model.get_parameter("layers.1.mlp.up.weight")[unit] *= scale
        # and head 3 (group 1) the strongest
        model.get_parameter("layers.1.attn.q.weight").view(4, 8, -1)[3] *= 25.0
    new, report = P.Pipeline([P.reorder()])(model)
    assert report.passes[0].max_abs_error_float64 <= 1e-9
    up_old = model.get_parameter("layers.1.mlp.up.weight")
    up_new = new.get_parameter("layers.1.mlp.up.weight")
    for pos, unit in enumerate((40, 7, 63)):
        torch.testing.assert_close(up_new[pos], up_old[unit], rtol=0, atol=0)
    q_new = new.get_parameter("layers.1.attn.q.weight").view(4, 8, -1)
    q_old = model.get_parameter("layers.1.attn.q.weight").view(4, 8, -1)
    torch.testing.assert_close(q_new[0], q_old[3], rtol=0, atol=0)  # its group moved first, it leads it
    k_new = new.get_parameter("layers.1.attn.k.weight").view(2, 8, -1)
    torch.testing.assert_close(k_new[0], model.get_parameter("layers.1.attn.k.weight").view(2, 8, -1)[1])
    # the prefix `extract` keeps now holds the strongest units
    sub, _ = P.Pipeline([P.extract(mlp="s")])(new)
    torch.testing.assert_close(sub.get_parameter("layers.1.mlp.up.weight")[:3], up_old[[40, 7, 63]], rtol=0, atol=0)
    assert spec == mptc.spec_of(new)


def test_reorder_by_activation():
    model = _model(SPECS / "nested-lm.mpt")
    batches = [mptc.example_inputs(mptc.spec_of(model), batch=4, seq=16, seed=s) for s in range(2)]
    with torch.no_grad():
        model.get_parameter("layers.2.mlp.up.weight")[50] *= 40.0
        model.get_parameter("layers.2.mlp.gate.weight")[50] *= 40.0
    new, report = P.Pipeline([P.reorder(by="activation", what="mlp", calibration=batches)])(model)
    assert report.passes[0].max_abs_error_float64 <= 1e-9
    torch.testing.assert_close(new.get_parameter("layers.2.mlp.up.weight")[0],
                               model.get_parameter("layers.2.mlp.up.weight")[50], rtol=0, atol=0)
    with pytest.raises(P.PassError, match="needs calibration data"):
        P.Pipeline([P.reorder(by="activation")])(model)


def test_cli_extract_onnx_and_run_mix(tmp_path, capsys):
    src = str(SPECS / "nested-lm.mpt")
    onnx_file = tmp_path / "sub.onnx"
    assert main(["extract", src, "--mix", "s,m,l,xl", "--drop-layers", "2", "-o", str(tmp_path / "sub")]) == 0
    assert "equals the parent" in capsys.readouterr().out
    assert mptc.load(tmp_path / "sub").n_layers == 3
    assert main(["extract", src, "--mix", "s,m,l,xl", "--drop-layers", "2", "-o", str(onnx_file)]) == 0
    ids = np.array([[5, 7, 9, 11, 13]])
    np.save(tmp_path / "ids.npy", ids)
    assert main(["run", src, "--ids-file", str(tmp_path / "ids.npy"), "--mix", "s,m,l,xl", "--drop-layers", "2",
                 "-o", str(tmp_path / "parent.npy")]) == 0
    assert main(["run", str(tmp_path / "sub"), "--ids-file", str(tmp_path / "ids.npy"), "--onnx", str(onnx_file),
                 "-o", str(tmp_path / "onnx.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "parent.npy"), atol=1e-4)
    assert main(["extract", src, "-o", str(tmp_path / "x")]) == 1
    assert "say what to extract" in capsys.readouterr().err
    assert main(["extract", str(SPECS / "tiny-bert.mpt"), "--drop-layers", "0", "-o", str(tmp_path / "x")]) == 1
    assert "layer 0 has placement = post: only a pre-norm layer (or a skippable one)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

"""Parameters say what they are (role, io kinds, the axis a norm runs over), passes declare the roles
they know, and a q/k norm (Qwen3, OLMo 2) is grown exactly or refused before anything runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import mptc
from mptc import passes as P
from mptc.errors import MptcError, SpecError
from mptc.lower import IO, PARAM_ROLES, Role
from mptc.model import param_info
from mptc.schema import parse
from mptc.spec import format_spec

SPEC = Path(__file__).parent / "specs" / "qknorm-lm.mpt"
QK = "layers.{i}.attn.{x}_norm.weight"


def qknorm() -> torch.nn.Module:
    model = mptc.build(mptc.load(SPEC), seed=0).eval()
    with torch.no_grad():  # gains away from 1, so that a wrong rescale shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def source(qk: str = "rmsnorm(eps = 1e-6)", layers: int = 2) -> str:
    return SPEC.read_text().replace("qk_norm = rmsnorm(eps = 1e-6)", f"qk_norm = {qk}").replace(
        "layers 2", f"layers {layers}")


# --- the language ----------------------------------------------------------------------------


def test_qk_norm_is_declared_printed_and_lowered():
    spec = mptc.load(SPEC)
    a = spec.layers[0].attention
    assert a.qk_norm == mptc.spec.Norm("rmsnorm", 1e-6)
    text = format_spec(spec)
    assert "qk_norm = rmsnorm(eps = 1e-06)" in text
    assert parse(text).layers[1].attention.qk_norm == a.qk_norm  # the canonical form reads back
    plain = parse(source("none"))
    assert plain.layers[0].attention.qk_norm is None and "qk_norm" not in format_spec(plain)
    info = param_info(mptc.build(spec, device="meta"))
    for i in range(2):
        for x, role in (("q", Role.NORM_Q), ("k", Role.NORM_K)):
            got = info[QK.format(i=i, x=x)]
            assert (got.role, got.axes, got.io, got.norm_over) == (role, ((f"K[{i}]",),), (IO.NORM,), f"K[{i}]")
    assert info["layers.0.attn_norm.weight"].norm_over == "D"


def test_per_layer_and_layernorm_qk_norms():
    spec = parse(source("[rmsnorm(eps = 1e-6), layernorm(eps = 1e-5)]"))
    assert [ly.attention.qk_norm.kind if ly.attention.qk_norm else None for ly in spec.layers] == \
        ["rmsnorm", "layernorm"]
    info = param_info(mptc.build(spec, device="meta"))
    assert "layers.0.attn.q_norm.bias" not in info and info["layers.1.attn.k_norm.bias"].axes == (("K[1]",),)
    assert "qk_norm = [rmsnorm(eps = 1e-06), layernorm(eps = 1e-05)]" in format_spec(spec)


def test_unknown_qk_norm_is_a_located_spec_error():
    text = source("batchnorm(eps = 1e-6)")
    with pytest.raises(SpecError, match="unknown qk_norm 'batchnorm'") as e:
        parse(text)
    line = next(n for n, s in enumerate(text.splitlines(), 1) if "batchnorm" in s)
    assert e.value.line == line


def test_qk_norm_computes_a_per_head_rmsnorm_before_rope():
    """The q/k norm is RMSNorm over each head's K values (gain shape (K,)), as Qwen3 computes it."""
    model = qknorm()
    spec = mptc.spec_of(model)
    x = mptc.example_inputs(spec, batch=2, seq=7, seed=3)
    h, k_dim = 4, 16
    seen = {}
    interp = torch.fx.Interpreter(model)
    run_node = interp.run_node

    def record(n):
        out = run_node(n)
        seen[n.name] = (n, out)
        return out

    interp.run_node = record
    with torch.no_grad():
        interp.run(*[x.get(name) for name in spec.inputs])
    q_lin = next(out for n, out in seen.values()
                 if n.target is F.linear and n.args[1].target == "layers.0.attn.q.weight")  # (B, T, H·K)
    gain = model.get_parameter("layers.0.attn.q_norm.weight")
    q = q_lin.view(2, 7, h, k_dim)
    want = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * gain  # (B, T, H, K)
    normed = [out for n, out in seen.values() if n.target is F.rms_norm and n.args[2].target == QK.format(i=0, x="q")]
    assert len(normed) == 1
    torch.testing.assert_close(normed[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [18, 23])
def test_onnx_runtime_matches_pytorch(opset, tmp_path):
    model = qknorm()
    mptc.export_onnx(model, tmp_path / "m.onnx", opset=opset)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=9, seed=5, padded=True)
    with torch.no_grad():
        ref = model(**x).numpy()
    got = mptc.run_onnx(tmp_path / "m.onnx", x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_summary_counts_the_qk_norm_gains():
    with_qk, without = mptc.build(parse(source()), device="meta"), mptc.build(parse(source("none")), device="meta")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_qk) - n(without) == 2 * 2 * 16  # q and k gains of K = 16 in 2 layers
    from mptc.summary import summarize
    a, b = summarize(mptc.spec_of(with_qk)), summarize(mptc.spec_of(without))
    assert a.params - b.params == 64 and a.layers[0].tensors["layers.0.attn.q_norm.weight"] == [16]


# --- roles as enums ------------------------------------------------------------------------


def test_node_meta_holds_enums_that_serialise_as_the_old_names():
    model = qknorm()
    roles = {n.meta["mptc"].role for n in model.graph.nodes if "mptc" in n.meta}
    assert all(isinstance(r, Role) for r in roles) and {Role.NORM_Q, Role.ATTN_SDPA, Role.INPUT} <= roles
    info = param_info(model)["layers.0.attn.q.weight"]
    assert info.role is Role.ATTN_Q and info.io == (IO.OUT, IO.IN) and all(isinstance(k, IO) for k in info.io)
    assert json.loads(json.dumps(dataclasses.asdict(info)))["role"] == "attn.q"
    assert json.loads(json.dumps(dataclasses.asdict(info)))["io"] == ["out", "in"]
    assert {i.role for i in param_info(model).values()} <= PARAM_ROLES


def test_every_growth_pass_knows_every_parameter_role_of_the_language():
    """A role added to the language must be taught to the passes: today each knows all of them."""
    for cls in (*P.GROWTH, P.Extract, P.Reorder):
        assert cls.handles == P.KNOWN_ROLES == PARAM_ROLES, cls.name


# --- passes on a q/k norm model ---------------------------------------------------------------


def test_grow_width_keeps_a_qk_norm_exactly():
    """Growing D leaves K alone and q, k unchanged, so the norm over K is kept as it is; only
    norms over D are rescaled."""
    model = qknorm()
    new, report = P.Pipeline([P.grow_width(width=96)])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5
    for i in range(2):
        for x in "qk":
            name = QK.format(i=i, x=x)
            assert torch.equal(new.get_parameter(name), model.get_parameter(name))
    g = model.get_parameter("layers.0.attn_norm.weight")
    torch.testing.assert_close(new.get_parameter("layers.0.attn_norm.weight")[:64], g * (64 / 96) ** 0.5)
    assert mptc.spec_of(new).layers[0].attention.qk_norm.eps == 1e-6  # its eps is not the D-norms' rescale
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=9, seed=11, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(new(**x), model(**x), rtol=1e-5, atol=1e-5)


def test_rescaling_the_qk_norm_as_a_d_norm_would_be_caught():
    """The old rule (every io-norm tensor × √(D/D')) breaks a q/k norm: the check sees it."""
    model = qknorm()
    p = P.grow_width(width=96)
    change = p.change(model)
    g = (64 / 96) ** 0.5
    wrong = dataclasses.replace(change, scale=lambda name, info: g if info.io == (IO.NORM,) else 1.0)
    new, _ = P.remap(model, wrong)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=9, seed=11)
    with torch.no_grad():
        assert (new(**x) - model(**x)).abs().max() > 1e-3


@pytest.mark.parametrize("p", [P.add_heads(n=2), P.grow_mlp(hidden=128), P.add_layers(n=1), P.grow_head_dim(value=24),
                               P.add_kv_heads(n=2), P.grow_vocab(vocab=1100)], ids=str)
def test_passes_that_leave_k_alone_keep_the_qk_norm(p):
    _, report = P.Pipeline([p])(qknorm())
    assert report.passes[0].max_abs_error_float64 <= 1e-9


def test_grow_qk_refuses_a_qk_norm_in_requires():
    model = qknorm()
    p = P.grow_qk(dim=20)
    with pytest.raises(P.PassRefused, match=r"grow_qk cannot grow layers\.0\.attn\.q_norm\.weight \(a norm over "
                       r"K\[0\]\) exactly: the new query dims are free") as e:
        p.requires(model)
    assert "add_heads" in e.value.hint
    # layers without a q/k norm still grow
    mixed = mptc.build(parse(source("[none, rmsnorm(eps = 1e-6)]")), seed=0).eval()
    _, report = P.Pipeline([P.grow_qk(dim=20, layers=[0])])(mixed)
    assert report.passes[0].max_abs_error_float64 <= 1e-9
    with pytest.raises(P.PassRefused, match=r"layers\.1\.attn\.q_norm"):
        P.grow_qk(dim=20, layers=[1]).requires(mixed)


def _with_info(model: torch.nn.Module, name: str, **edit) -> torch.nn.Module:
    """The model with one parameter's NodeInfo changed (the module's table and the graph's node)."""
    infos = dict(param_info(model))
    infos[name] = dataclasses.replace(infos[name], **edit)
    model.meta["mptc.params"] = infos
    for n in model.graph.nodes:
        if n.op == "get_attr" and n.target == name:
            n.meta["mptc"] = infos[name]
    return model


GROWTH = [P.grow_mlp(hidden=128), P.add_heads(n=2), P.add_kv_heads(n=2), P.grow_head_dim(value=24),
          P.grow_qk(dim=20, layers=[0]), P.grow_width(width=96), P.add_layers(n=1), P.grow_vocab(vocab=1100),
          P.grow_context(context=80)]


@pytest.mark.parametrize("p", GROWTH, ids=str)
def test_an_unknown_role_is_refused_by_every_growth_pass_in_requires(p):
    model = _with_info(mptc.build(parse(source("none")), seed=0).eval(), "layers.1.mlp_norm.weight",
                       role="norm.sink")
    with pytest.raises(P.PassRefused, match=rf"{p.name} does not know how to rewrite layers\.1\.mlp_norm\.weight "
                       r"\(a norm over D, role norm\.sink\)") as e:
        p.requires(model)
    assert "handles" in e.value.hint


def test_extraction_passes_refuse_an_unknown_role_too():
    model = _with_info(qknorm(), "layers.0.attn.q.weight", role="attn.sink")
    with pytest.raises(P.PassRefused, match=r"reorder does not know how to rewrite layers\.0\.attn\.q\.weight "
                       r"\(role attn\.sink\)"):
        P.Reorder().requires(model)


def test_grow_width_refuses_a_norm_that_does_not_say_its_axis():
    model = _with_info(qknorm(), "layers.0.attn.k_norm.weight", norm_over=None)
    with pytest.raises(P.PassRefused, match=r"grow_width does not know how to grow layers\.0\.attn\.k_norm\.weight"):
        P.grow_width(width=96).requires(model)


# --- Hugging Face export ---------------------------------------------------------------------


def test_export_hf_refuses_a_parameter_llama_has_no_place_for(tmp_path):
    from mptc.hf import to_hf
    src = source()
    with pytest.raises(MptcError, match=r"cannot export as Llama: it has no weight for layers\.0\.attn\.q_norm\.weight "
                       r"\(a norm over K\[0\], role norm\.q\)") as e:
        to_hf(mptc.build(parse(src), seed=0), tmp_path / "out", family="llama")
    assert "qk_norm" in e.value.hint and not (tmp_path / "out").exists()
    assert e.value.line == next(n for n, s in enumerate(src.splitlines(), 1) if "qk_norm" in s)

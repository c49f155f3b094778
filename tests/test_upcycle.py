"""The mixture-of-experts MLP (`mlp { experts = E, top_k = K, … }`) and `upcycle_moe`: a dense MLP becomes
E identical experts and a router, exactly; the other growth passes reach the experts; the result exports
and trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import mptc
from mptc import ops
from mptc import passes as P
from mptc.errors import SpecError
from mptc.export import run_onnx
from mptc.lower import ACT
from mptc.passes.parse import parse_passes
from mptc.passes.verify import certificate_problems

from .conftest import perturbed, tiny

MOE = """
model moe {{
  vocab = 200
  context = 32
  width = 32
  embed {{ positions = rope(theta = 10000.0) }}
  layers 2 {{
    norm = rmsnorm(eps = 1e-6)
    attention {{ heads = 4, kv_heads = 2, bias = false }}
    mlp {{ hidden = 24, activation = swiglu, bias = false, {moe} }}
  }}
  head lm {{ norm = rmsnorm(eps = 1e-6) }}
}}
"""


def moe_spec(moe: str = "experts = 4, top_k = 2") -> mptc.Spec:
    return mptc.parse(MOE.format(moe=moe))


def f64(model):
    return copy.deepcopy(model).double()


def run(model, seed: int = 4, **kw) -> tuple[dict, torch.Tensor]:
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=7, seed=seed, padded=True, **kw)
    with torch.no_grad():
        return x, model(**x)


# --- the construct ---------------------------------------------------------------------------------------


def reference_moe(model, i: int, h: torch.Tensor) -> torch.Tensor:
    """Layer i's MLP on h (N, D), token by token and expert by expert (the gather form, written out)."""
    m = mptc.spec_of(model).layers[i].mlp
    pre = f"layers.{i}.mlp."
    p = {k.removeprefix(pre): v for k, v in model.state_dict().items() if k.startswith(pre)}
    out = []
    for x in h:
        probs = torch.softmax(p["router.weight"] @ x, -1)
        top, idx = probs.topk(m.top_k)
        if m.normalize:
            top = top / top.sum()
        y = torch.zeros_like(x)
        for g, e in zip(top, idx.tolist(), strict=True):
            z = F.silu(p["experts.gate.weight"][e] @ x) * (p["experts.up.weight"][e] @ x)
            y = y + g * (p["experts.down.weight"][e] @ z)
        if m.shared is not None:
            s = p["shared.down.weight"] @ (F.silu(p["shared.gate.weight"] @ x) * (p["shared.up.weight"] @ x))
            y = y + (torch.sigmoid(p["shared_gate.weight"] @ x) * s if m.shared_gate else s)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("moe", ["experts = 4, top_k = 2",  # Mixtral: renormalised top-k
                                 "experts = 4, top_k = 2, normalize = false, shared = 16, shared_gate = true"])  # Qwen2
def test_the_moe_mlp_computes_the_gated_sum_of_its_top_k_experts(moe):
    model = perturbed(moe_spec(moe)).double()
    h = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = mptc.spec_of(model).layers[0].mlp
    sd = model.state_dict()
    w = {k.removeprefix("layers.0.mlp."): v for k, v in sd.items() if k.startswith("layers.0.mlp.")}
    gates = ops.moe_gates(h, w["router.weight"], m.top_k, m.normalize)
    assert int((gates > 0).sum(-1).max()) == 2
    assert torch.allclose(gates.sum(-1), torch.ones(6, dtype=torch.float64)) == m.normalize
    z = ACT["silu"](ops.expert_linear(h, w["experts.gate.weight"])) * ops.expert_linear(h, w["experts.up.weight"])
    y = ops.expert_mix(z, w["experts.down.weight"], None, gates)
    if m.shared is not None:
        s = w["shared.down.weight"] @ (F.silu(w["shared.gate.weight"] @ h.T) * (w["shared.up.weight"] @ h.T))
        y = y + torch.sigmoid(h @ w["shared_gate.weight"].T) * s.T
    torch.testing.assert_close(y, reference_moe(model, 0, h), rtol=1e-12, atol=1e-12)


def test_moe_spec_round_trips_and_names_its_parameters():
    s = moe_spec("experts = [4, none], top_k = [1, none], shared = [16, none], shared_gate = [true, false]")
    assert mptc.parse(str(s)) == s and s.layers[1].mlp.experts is None and s.layers[0].mlp.top_k == 1
    shapes = {k: tuple(v.shape) for k, v in mptc.build(s).state_dict().items() if ".mlp." in k}
    assert shapes == {
        "layers.0.mlp.router.weight": (4, 32), "layers.0.mlp.experts.up.weight": (4, 24, 32),
        "layers.0.mlp.experts.gate.weight": (4, 24, 32), "layers.0.mlp.experts.down.weight": (4, 32, 24),
        "layers.0.mlp.shared.up.weight": (16, 32), "layers.0.mlp.shared.gate.weight": (16, 32),
        "layers.0.mlp.shared.down.weight": (32, 16), "layers.0.mlp.shared_gate.weight": (1, 32),
        "layers.1.mlp.up.weight": (24, 32), "layers.1.mlp.gate.weight": (24, 32), "layers.1.mlp.down.weight": (32, 24)}
    assert mptc.parse(str(moe_spec())).layers[0].mlp.top_k == 2


@pytest.mark.parametrize("moe, words, at", [
    ("experts = 4, top_k = 5", "top_k = 5 exceeds experts = 4", "5"),
    ("top_k = 2", "top_k applies to a mixture-of-experts MLP", "2"),
    ("experts = 4, shared_gate = true", "shared_gate gates the shared expert, and there is none", "true"),
    ("experts = 0", "experts must be at least 1", "0"),
    ("normalize = false", "normalize applies to a mixture-of-experts MLP", "false"),
])
def test_moe_spec_errors(moe, words, at):
    text = MOE.format(moe=moe)
    with pytest.raises(SpecError, match=words) as e:
        mptc.parse(text)
    line, col = e.value.span.line, e.value.span.col
    row = text.splitlines()[line - 1]
    assert row.strip().startswith("mlp {") and row[col - 1:].startswith(at)


# --- upcycling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [
    ("llama", {}),
    ("gpt2", {"router": "random"}),
    ("gpt2", {"normalize": False}),
    ("llama", {"experts": 3, "top_k": 3, "router": "random", "normalize": False}),
])
def test_upcycling_keeps_the_function(name, kw):
    model = tiny(name).double()
    p = P.upcycle_moe(experts=kw.pop("experts", 4), top_k=kw.pop("top_k", 2), layers=[0], **kw)
    new, report = P.Pipeline([p])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5
    _, a = run(model)
    _, b = run(new)
    assert float((a - b).abs().max()) <= 1e-9
    m = mptc.spec_of(new).layers
    assert (m[0].mlp.experts, m[0].mlp.top_k, m[1].mlp.experts) == (p.experts, p.top_k, None)
    claims = {t["tensor"]: t["claims"] for t in r.tensors}
    assert claims["layers.0.mlp.router.weight"] == ["new tensor, " + ("zero" if p.router == "zero" else "free")]
    assert claims["layers.0.mlp.experts.up.weight"] == [f"axis 0: {p.experts - 1} copies"]
    down = claims["layers.0.mlp.experts.down.weight"]
    if p.normalize or p.top_k == p.experts:
        assert down == [f"axis 0: {p.experts - 1} copies"]
    else:  # the zero router's gates are 1/E, k of them: the copies × E/k
        assert down == [f"axis 0: {p.experts - 1} copies", f"old entries scaled ×{p.experts / p.top_k:.9g}"]


@pytest.mark.parametrize("name, width", [("llama", P.grow_width(width=80)), ("gpt2", P.grow_width(factor=2))])
def test_upcycled_models_grow(name, width, tmp_path):
    model = tiny(name)
    steps = [P.upcycle_moe(experts=4, top_k=2, router="random"), P.grow_mlp(factor=2.0), P.add_layers(n=1), width]
    new, report = P.Pipeline(steps)(model)
    assert all(r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5 for r in report.passes)
    s, old = mptc.spec_of(new), mptc.spec_of(model)
    assert s.n_layers == old.n_layers + 1 and all(ly.mlp.experts == 4 for ly in s.layers)
    assert s.layers[0].mlp.hidden == 2 * old.layers[0].mlp.hidden and s.width > old.width
    grown = {t["tensor"]: t["claims"] for t in report.passes[1].tensors}
    assert grown["layers.0.mlp.experts.down.weight"] == [f"axis 2: {old.layers[0].mlp.hidden} new entries, zero"]
    added = {t["tensor"]: t["claims"] for t in report.passes[2].tensors}
    assert added[f"layers.{old.n_layers}.mlp.experts.down.weight"] == ["new tensor, zero"]
    if name == "gpt2":  # ONNX Runtime agrees with the original model (one export: the traced exporter takes seconds)
        mptc.export_onnx(new, tmp_path / "m.onnx")
        x, ref = run(model)
        torch.testing.assert_close(torch.as_tensor(run_onnx(tmp_path / "m.onnx", x)), ref, rtol=1e-5, atol=2e-5)


def test_the_certificate_catches_an_expert_that_is_not_a_copy():
    model = tiny("llama")
    new, cert = P.upcycle_moe(experts=4, layers=[0]).apply(model)
    assert certificate_problems(model, new, cert) == []
    with torch.no_grad():
        new.get_parameter("layers.0.mlp.experts.down.weight")[2, 0, 0] += 1.0
    assert certificate_problems(model, new, cert) == [
        "layers.0.mlp.experts.down.weight: the entries taken from layers.0.mlp.down.weight differ from it"]


@pytest.mark.parametrize("p", [P.grow_width(factor=2), P.grow_width(width=48), P.grow_mlp(hidden=40),
                               P.add_layers(n=1)])
def test_growth_reaches_a_shared_expert_and_its_gate(p):
    model = perturbed(moe_spec("experts = 4, top_k = 2, normalize = false, shared = 16, shared_gate = true")).double()
    new, report = P.Pipeline([p])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5
    _, a = run(model)
    _, b = run(new)
    assert float((a - b).abs().max()) <= 1e-9
    claims = {t["tensor"]: t["claims"] for t in r.tensors}
    if isinstance(p, P.GrowWidth):
        gate = claims["layers.0.mlp.shared_gate.weight"]
        want = ["axis 1: 32 copies", "old entries scaled ×0.5"] if p.factor else ["axis 1: 16 new entries, free"]
        assert gate == want


def test_noise_is_added_after_the_check():
    model = tiny("llama")
    quiet, _ = P.Pipeline([P.upcycle_moe(experts=4, layers=[1])])(model)
    noisy, report = P.Pipeline([P.upcycle_moe(experts=4, layers=[1], noise=0.01)])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9  # the check saw the exact copies
    assert r.notes and "after the check, normal(0, 0.01) noise" in r.notes[0] and "layers [1]" in r.notes[0]
    name = "layers.1.mlp.experts.up.weight"
    up_q, up_n = quiet.get_parameter(name).detach(), noisy.get_parameter(name).detach()
    assert all(torch.equal(up_q[e], up_q[0]) for e in range(4))  # without noise: identical copies
    delta = (up_n - up_q).flatten()
    assert abs(float(delta.std()) - 0.01) < 1e-3 and not torch.equal(up_n[1], up_n[0])
    assert torch.equal(noisy.get_parameter("layers.1.mlp.router.weight"), torch.zeros(4, 64))  # only the experts


def test_upcycled_model_trains_and_its_optimizer_state_grows():
    model = tiny("gpt2").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))

    def step(m, o) -> float:
        loss = F.cross_entropy(m(input_ids=ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        o.zero_grad()
        loss.backward()
        o.step()
        return float(loss.detach())

    step(model, opt)
    up = opt.state[model.get_parameter("layers.0.mlp.up.weight")]["exp_avg"]
    new, report = P.Pipeline([P.upcycle_moe(experts=4, top_k=2, noise=0.02)], check=False)(model, optimizer=opt)
    opt = report.optimizer
    st = opt.state[new.get_parameter("layers.0.mlp.experts.up.weight")]["exp_avg"]
    assert st.shape == (4, 256, 64) and all(torch.equal(st[e], up) for e in range(4))
    losses = [step(new, opt) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert float(new.get_parameter("layers.0.mlp.router.weight").detach().abs().max()) > 0  # the zero router learns


@pytest.mark.parametrize("p, model, words", [
    (lambda: P.upcycle_moe(experts=4, router="random", normalize=False), "llama", "exact only with router = zero"),
    (lambda: P.upcycle_moe(experts=4, top_k=5), "llama", "top_k must be between 1 and experts = 4"),
    (lambda: P.upcycle_moe(experts=4, router="uniform"), "llama", "unknown router"),
    (lambda: P.upcycle_moe(experts=2), "moe", "already a mixture of 4 experts"),
])
def test_upcycle_refusals(p, model, words, monkeypatch):
    monkeypatch.setattr(P.pipeline, "probes", lambda *a, **k: pytest.fail("a probe check ran"))
    with pytest.raises(P.PassRefused, match=words):
        P.Pipeline([p()])(tiny(model) if model != "moe" else mptc.build(moe_spec()))


def test_upcycle_from_pass_text():
    [p] = parse_passes("upcycle_moe(experts = 4, top_k = 1, layers = [0, 2], noise = 0.01, router = random)")
    assert p == P.upcycle_moe(experts=4, top_k=1, layers=[0, 2], noise=0.01, router="random")
    assert P.PASSES["upcycle_moe"] is P.UpcycleMoE

"""Growth passes: each keeps the function (float64 ≤ 1e-9) wherever it applies, and refuses clearly
where it cannot; certificates are checked; optimizer state grows with the weights."""

from __future__ import annotations

import pytest
import torch

import mptc
from mptc import passes as P
from mptc.passes.engine import coupling_graph, sites

from .conftest import tiny

# (pass, the tiny models it applies to); the others must refuse with the given message
CASES = [
    (P.grow_mlp(hidden=300), "gpt2 llama bert vit", None),
    (P.grow_mlp(factor=1.5, layers=[0], init="copy"), "gpt2 llama bert vit", None),
    (P.add_heads(n=2), "gpt2 llama bert vit", None),
    (P.add_heads(n=4, mode="kv"), "gpt2 llama bert vit", None),
    (P.grow_head_dim(value=24), "gpt2 llama bert vit", None),
    (P.grow_qk(dim=20), "gpt2 llama bert vit", None),
    (P.grow_width(width=96), "llama", "not exact for LayerNorm"),
    (P.add_layers(n=2, at=1), "gpt2 llama vit", "not exact for post-norm"),
    (P.add_layers(n=1, init="copy"), "gpt2 llama vit", "not exact for post-norm"),
    (P.add_kv_heads(n=2), "llama", "cannot go from"),
    (P.grow_vocab(vocab=1234), "gpt2 llama bert", "needs a model that reads tokens"),
    (P.grow_context(context=100), "gpt2 llama bert", "applies to token models"),
]
MODELS = ["gpt2", "llama", "bert", "vit"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("p,applies,refusal", CASES, ids=[str(c[0]) for c in CASES])
def test_growth_preserves_the_function(p, applies, refusal, name):
    model = tiny(name)
    if name not in applies.split():
        with pytest.raises(P.PassError, match=refusal):
            P.Pipeline([p])(model)
        return
    new, report = P.Pipeline([p])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5
    assert r.params_after > r.params_before or isinstance(p, (P.GrowContext, P.AddKVHeads))
    rope_context = isinstance(p, P.GrowContext) and mptc.spec_of(model).embed.positions.kind != "learned"
    assert bool(r.tensors) != rope_context  # only learned positions have a tensor to grow
    # independent of the pipeline's own check: compare the outputs here
    spec = mptc.spec_of(model)
    x = mptc.example_inputs(spec, batch=3, seq=9, seed=11, padded=True)
    with torch.no_grad():
        a, b = model(**x), new(**x)
    if isinstance(p, P.GrowVocab):
        b = b[..., : spec.vocab]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_each_rule_claims_what_the_paper_says():
    model = tiny("llama")
    _, cert = P.grow_qk(dim=16, layers=[1]).apply(model)
    claims = {c.name: c for c in cert.claims}
    assert set(claims) == {"layers.1.attn.q.weight", "layers.1.attn.k.weight"}
    k = claims["layers.1.attn.k.weight"]
    assert k.scale == pytest.approx((16 / 12) ** 0.5) and k.zero == [True, True]
    assert claims["layers.1.attn.q.weight"].scale == 1.0
    new, cert = P.grow_mlp(hidden=128, layers=[2]).apply(model)
    down = new.get_parameter("layers.2.mlp.down.weight")
    assert torch.count_nonzero(down[:, 96:]) == 0 and torch.count_nonzero(new.get_parameter(
        "layers.2.mlp.up.weight")[96:]) > 0
    new, _ = P.grow_width(width=72).apply(model)
    g_old, g_new = model.get_parameter("layers.0.attn_norm.weight"), new.get_parameter("layers.0.attn_norm.weight")
    torch.testing.assert_close(g_new[:64], g_old * (64 / 72) ** 0.5, rtol=0, atol=0)
    assert mptc.spec_of(new).layers[0].norm.eps == pytest.approx(1e-6 * 64 / 72)


def test_gqa_join_keeps_groups_contiguous():
    model = tiny("llama")  # 8 heads in 2 kv groups of 4, head_dim 12
    new, _ = P.add_heads(n=2).apply(model)
    a = mptc.spec_of(new).layers[0].attention
    assert (a.heads, a.kv_heads) == (10, 2)
    q_old = model.get_parameter("layers.0.attn.q.weight").view(8, 12, -1)
    q_new = new.get_parameter("layers.0.attn.q.weight").view(10, 12, -1)
    torch.testing.assert_close(q_new[0:4], q_old[0:4])  # group 0 keeps its heads first,
    torch.testing.assert_close(q_new[5:9], q_old[4:8])  # then its new head; group 1 follows
    o_new = new.get_parameter("layers.0.attn.o.weight").view(-1, 10, 12)
    assert torch.count_nonzero(o_new[:, [4, 9]]) == 0


def test_add_kv_heads_duplicates_groups():
    model = tiny("llama")
    new, cert = P.add_kv_heads(n=2).apply(model)
    k_old = model.get_parameter("layers.0.attn.k.weight").view(2, 12, -1)
    k_new = new.get_parameter("layers.0.attn.k.weight").view(4, 12, -1)
    for g in range(4):
        torch.testing.assert_close(k_new[g], k_old[g // 2], rtol=0, atol=0)
    assert any("copies" in k for c in cert.claims for k in c.kinds())


def test_rope_growth_keeps_rotary_dims():
    model = tiny("llama")
    new, _ = P.Pipeline([P.grow_qk(dim=16)])(model)
    a = mptc.spec_of(new).layers[0].attention
    assert (a.head_dim, a.rotary_dim) == (16, 12)
    assert "rotary_dim = 12" in str(mptc.spec_of(new))
    with pytest.raises(P.PassError, match="odd number"):
        P.Pipeline([P.grow_qk(dim=15)])(model)


@pytest.mark.parametrize("p,msg", [
    (P.grow_mlp(hidden=32), "cannot shrink"),
    (P.grow_mlp(), "exactly one of"),
    (P.grow_mlp(hidden=200, layers=[3]), "layer 3 is out of range; the model has 3 layers"),
    (P.add_heads(n=3), "multiple of 2"),
    (P.add_heads(n=2, mode="kv"), "multiple of 4"),
    (P.add_kv_heads(n=1), "reachable kv head counts: 4, 8"),
    (P.grow_width(width=32), "cannot shrink"),
    (P.add_layers(n=1, at=7), "at = 7 is out of range; use 0..3"),
    (P.grow_head_dim(value=4), "cannot shrink"),
])
def test_impossible_requests_are_refused(p, msg):
    with pytest.raises(P.PassError, match=msg):
        P.Pipeline([p])(tiny("llama"))


def test_a_lying_certificate_is_caught(monkeypatch):
    import mptc.passes.engine as E

    real = E.remap

    def tampered(model, change):
        new, cert = real(model, change)
        with torch.no_grad():
            new.get_parameter("layers.0.mlp.down.weight")[:, -1] = 0.5  # should be zero
        return new, cert

    monkeypatch.setattr("mptc.passes.base.remap", tampered)
    with pytest.raises(P.PassError, match="layers.0.mlp.down.weight: the new entries of axis 1 should be zero"):
        P.Pipeline([P.grow_mlp(hidden=100)])(tiny("llama"))


def test_composed_growth_round_trips_through_a_model_dir(tmp_path):
    model = tiny("llama")
    new, report = P.Pipeline([P.grow_mlp(factor=2.0), P.add_layers(n=1, at=1), P.grow_width(width=80),
                              P.add_heads(n=2), P.grow_vocab(vocab=1010)])(model)
    assert [r.name for r in report.passes] == ["grow_mlp", "add_layers", "grow_width", "add_heads", "grow_vocab"]
    mptc.save(new, tmp_path / "grown")
    again = mptc.load_model(tmp_path / "grown").eval()
    assert mptc.spec_of(again) == mptc.spec_of(new)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(again(**x), new(**x), rtol=0, atol=0)
        torch.testing.assert_close(new(**x)[..., :1000], model(**x), rtol=1e-5, atol=1e-5)


def test_coupling_graph_reaches_every_site():
    model = tiny("llama")
    g = coupling_graph(model)
    h0 = sites(g, "H[0]")
    assert ("param", "layers.0.attn.q.weight", 0) in h0 and ("param", "layers.0.attn.o.weight", 1) in h0
    assert any(s[0] == "const" for s in h0)  # the view that splits heads
    d = {s[1] for s in sites(g, "D") if s[0] == "param"}
    assert {"embed.tokens.weight", "head.out.weight", "layers.2.mlp.down.weight", "head.norm.weight"} <= d


def test_optimizer_state_grows_and_training_continues():
    torch.manual_seed(0)
    model = tiny("llama").train()
    spec = mptc.spec_of(model)
    x = mptc.example_inputs(spec, batch=4, seq=16, seed=5)

    def loss_of(m):
        logits = m(**x)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x["input_ids"][:, 1:].flatten())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(5):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    with torch.no_grad():
        before = loss_of(model).item()
    grown, report = P.Pipeline([P.grow_mlp(factor=2.0), P.add_layers(n=1), P.grow_width(width=80)])(
        model, optimizer=opt)
    opt2 = report.optimizer
    assert isinstance(opt2, torch.optim.AdamW) and opt2.defaults["weight_decay"] == 0.01
    with torch.no_grad():
        after = loss_of(grown).item()
    assert after == pytest.approx(before, rel=1e-5)
    up = grown.get_parameter("layers.0.mlp.up.weight")
    st = opt2.state[up]
    assert int(st["step"]) == 5
    assert torch.count_nonzero(st["exp_avg"][96:]) == 0 and torch.count_nonzero(st["exp_avg"][:96]) > 0
    old_st = opt.state[model.get_parameter("layers.0.mlp.up.weight")]
    torch.testing.assert_close(st["exp_avg_sq"][:96, :64], old_st["exp_avg_sq"])
    losses = []
    for _ in range(10):
        opt2.zero_grad()
        loss = loss_of(grown)
        loss.backward()
        opt2.step()
        losses.append(loss.item())
    assert losses[-1] < after

"""The lowered module: masking, padding, dropout, seeds, metadata, training."""

from __future__ import annotations

import pytest
import torch

import mptc
from mptc.dims import sizes
from mptc.graph import param_info
from mptc.lower import NodeInfo

from .conftest import tiny


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_mask_later_tokens_do_not_change_earlier_logits(name):
    model = tiny(name)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=12)
    ids2 = x["input_ids"].clone()
    ids2[:, 7:] = (ids2[:, 7:] + 17) % model.meta["mptc.spec"].vocab
    with torch.no_grad():
        a = model(input_ids=x["input_ids"])
        b = model(input_ids=ids2)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # the later positions did change


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_padding_does_not_change_real_tokens(name):
    model = tiny(name)
    spec = mptc.spec_of(model)
    x = mptc.example_inputs(spec, batch=1, seq=6)
    real = x["input_ids"]
    padded = torch.cat([real, torch.tensor([[5, 9, 11, 3]])], dim=1)  # 4 padding tokens
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        a = model(input_ids=real, attention_mask=torch.ones_like(real))
        b = model(input_ids=padded, attention_mask=mask)
    if spec.head.kind == "lm":
        a, b = a[:, :6], b[:, :6]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # without the mask the padding tokens do leak into a bidirectional encoder
    if spec.layers[0].attention.mask == "bidirectional":
        with torch.no_grad():
            c = model(input_ids=padded)
        assert (a - c).abs().max() > 1e-4


def test_mean_pool_ignores_padding():
    spec = mptc.parse("""
    model m {
      vocab = 8
      context = 8
      width = 8
      layers 1 { attention { heads = 2, mask = bidirectional }, mlp { hidden = 16 } }
      head classify { classes = 3, pool = mean }
    }""")
    model = mptc.build(spec, seed=1).eval()
    ids = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[3, 4, 5, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), model(input_ids=padded, attention_mask=mask),
                                   rtol=0, atol=1e-5)


def test_fully_padded_rows_stay_finite():
    model = tiny("gpt2")
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])  # left padding: the first queries see no real key
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out).all()


def test_dropout_only_in_training():
    model = tiny("gpt2")
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8)
    with torch.no_grad():
        e1, e2 = model(**x), model(**x)
        model.train()
        t1, t2 = model(**x), model(**x)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert (t1 - t2).abs().max() > 1e-4


def test_seed_is_deterministic():
    spec = mptc.spec_of(tiny("llama"))
    a, b, c = (mptc.build(spec, seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.q.weight"], c["layers.0.attn.q.weight"])


def test_meta_build_allocates_nothing():
    spec = mptc.parse("""
    model big {
      vocab = 32000
      width = 4096
      embed { positions = rope(theta = 10000.0) }
      layers 48 {
        norm = rmsnorm(eps = 1e-5)
        attention { heads = 32, kv_heads = 8, bias = false }
        mlp { hidden = 11008, activation = swiglu, bias = false }
      }
      head lm { norm = rmsnorm(eps = 1e-5) }
    }""")
    model = mptc.build(spec, device="meta")
    assert all(p.is_meta for p in model.parameters())
    s = mptc.summarize(spec)
    per_layer = 2 * 4096 + 4096 * 4096 * 2 + 2 * 1024 * 4096 + 3 * 4096 * 11008
    assert s.params == 48 * per_layer + 2 * 32000 * 4096 + 4096
    assert len(s.layers) == 48


def test_node_metadata_names_layers_roles_and_symbols():
    model = tiny("llama")
    spec = mptc.spec_of(model)
    info = param_info(model)
    q = info["layers.1.attn.q.weight"]
    assert q == NodeInfo("attn.q", 1, (("H[1]", "K[1]"), ("D",)), None, "normal", ("out", "in"))
    assert info["layers.2.mlp.down.weight"].axes == (("D",), ("F[2]",))
    assert info["layers.0.attn.o.weight"].init == "residual"
    # every parameter's shape is the product of its symbols' sizes
    sz = sizes(spec)
    for name, ni in info.items():
        want = tuple(int(torch.tensor([sz[s] for s in ax]).prod()) for ax in ni.axes)
        assert tuple(model.get_parameter(name).shape) == want, name
    # shape constants carry symbols too: the q view splits (H[l], K[l])
    views = [n for n in model.graph.nodes if n.op == "call_method" and n.target == "view"
             and n.meta["mptc"].role == "attn.q" and n.meta["mptc"].layer == 0]
    assert len(views) == 1 and views[0].meta["mptc"].shape == (None, None, "H[0]", "K[0]")
    assert views[0].args[3:] == (spec.layers[0].attention.heads, spec.layers[0].attention.head_dim)
    sdpa = [n for n in model.graph.nodes if n.meta["mptc"].role == "attn.sdpa"]
    assert len(sdpa) == spec.n_layers
    assert all(n.target is torch.nn.functional.scaled_dot_product_attention for n in sdpa)


def test_graph_lints_and_is_trainable():
    model = tiny("llama").train()
    model.graph.lint()
    spec = mptc.spec_of(model)
    x = mptc.example_inputs(spec, batch=4, seq=16, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(**x)
        targets = x["input_ids"][:, 1:].flatten()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, spec.vocab), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_heterogeneous_layers_compile():
    spec = mptc.parse("""
    model mixed {
      vocab = 100
      context = 16
      width = 32
      layers 3 {
        attention { heads = [4, 2, 8], kv_heads = [2, 1, 8], head_dim = [8, 16, 6], value_dim = [8, 4, 5] }
        mlp { hidden = [64, 16, 40], activation = [gelu, swiglu, relu] }
        placement = [pre, post, pre]
      }
      head lm { tied = true }
    }""")
    model = mptc.build(spec).eval()
    out = model(**mptc.example_inputs(spec, batch=2, seq=5))
    assert out.shape == (2, 5, 100)
    assert tuple(model.get_parameter("layers.2.attn.v.weight").shape) == (8 * 5, 32)
    assert tuple(model.get_parameter("layers.1.mlp.gate.weight").shape) == (16, 32)


def test_vit_takes_pixel_values():
    model = tiny("vit")
    spec = mptc.spec_of(model)
    assert spec.inputs == ("pixel_values",) and spec.seq_len == 17
    out = model(pixel_values=torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)


def test_sinusoidal_positions_match_the_formula():
    from mptc.ops import sinusoidal

    t = sinusoidal(torch.zeros(1, 5, 6))
    pos, i = 3, 1
    angle = pos / 10000 ** (2 * i / 6)
    torch.testing.assert_close(t[pos, 2 * i], torch.tensor(angle).sin())
    torch.testing.assert_close(t[pos, 2 * i + 1], torch.tensor(angle).cos())

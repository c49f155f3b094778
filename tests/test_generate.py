"""The KV-cached graph and `mptc.generate`: cached == uncached logits (GQA, tied, windowed, grown, left padding),
greedy generation == full recomputation == transformers, seeded sampling, top-k / top-p, eos, streaming, timings,
and the refusals (encoders, other features, too-long contexts, bad prompts)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import mptc
from mptc import ops
from mptc.errors import MptcError
from mptc.generate import Generation, generate, generate_timed, next_tokens
from mptc.model import build, cached, is_cached
from mptc.nested import granularity
from mptc.spec import Task

from .conftest import ROOT, perturbed
from .decoders import greedy_reference, prompt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy machine

TOL = 1e-5  # float32, relative to max(1, |logits|): the decoders' logits reach ~50
STEPS = 8  # decode steps after the prefill in the cached-vs-uncached check
NEW = 32  # tokens generated in the greedy checks


def _past(presents) -> dict[str, torch.Tensor]:
    """The cached graph's past inputs from its presents."""
    return {f"past_{kv}_{i}": t for i, (k, v) in enumerate(presents) for kv, t in (("key", k), ("value", v))}


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= TOL, f"max error {err:.2e} relative to max(1, |logits|)"


def _decoder(request, name: str):
    return request.getfixturevalue(f"{name}_decoder")


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral", "grown"])
def test_cached_matches_uncached(request, name):
    """Prefill 6 tokens (row 0 left-padded by 2), then 8 one-token steps: every real position's logits equal
    the uncached forward of the whole sequence; each layer's cache has its own (G, K, Dv)."""
    d = _decoder(request, name)
    model, spec = d.model, d.spec
    step = cached(model)
    ids, mask = prompt(spec.vocab)
    more = torch.randint(1, spec.vocab, (2, STEPS), generator=torch.Generator().manual_seed(5))
    full, fmask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)  # (2, 14)
    ref = model(input_ids=full, attention_mask=fmask)  # (2, 14, V)
    t = full.shape[1]
    pos = torch.arange(t).expand(2, t)  # the uncached graph numbers positions 0..T-1, padding included
    logits, presents = step(input_ids=ids, attention_mask=mask, position_ids=pos[:, :6])
    outs = [logits]
    for j in range(6, t):
        logits, presents = step(input_ids=full[:, j:j + 1], attention_mask=fmask[:, :j + 1],
                                position_ids=pos[:, j:j + 1], **_past(presents))
        assert logits.shape == (2, 1, spec.vocab)
        outs.append(logits)
    real = fmask.bool()
    _close(torch.cat(outs, 1)[real], ref[real])
    assert len(presents) == spec.n_layers
    for (k, v), ly in zip(presents, spec.layers, strict=True):
        a = ly.attention
        assert k.shape == (2, a.kv_heads, t, a.head_dim) and v.shape == (2, a.kv_heads, t, a.value_dim)
    if name == "grown":  # heterogeneous: the grown layer 0 caches 4 kv heads, the others 2
        assert [k.shape[1] for k, _ in presents] == [4, 2, 2]


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_padding_positions(request, name):
    """With the default positions (cumsum(mask) − 1), a left-padded row gives the logits of the same tokens
    unpadded, in the prefill and in later steps (learned positions shift nothing either)."""
    d = _decoder(request, name)
    step = cached(d.model)
    ids, mask = prompt(d.spec.vocab)  # row 0: 2 pads, then 4 tokens
    nxt = torch.tensor([[7], [9]])
    logits, presents = step(input_ids=ids, attention_mask=mask)
    logits2, _ = step(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), **_past(presents))
    alone = torch.cat([ids[0:1, 2:], nxt[0:1]], 1)  # (1, 5), no padding
    ref = d.model(input_ids=alone)  # (1, 5, V)
    _close(logits[0, 2:], ref[0, :4])
    _close(logits2[0, 0], ref[0, 4])


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "mistral"])
def test_greedy_matches_recomputation_and_transformers(request, name):
    """32 greedy tokens: the cached generate == argmax of the full forward each step (unpadded) == transformers'
    generate(do_sample=False) on the original weights (left-padded, positions from the mask on both sides), for
    GQA, q/k/v biases, a tied head with learned positions, and Mistral's sliding window of 4 against the cache."""
    d = _decoder(request, name)
    ids, mask = prompt(d.spec.vocab)
    full = ids[1:].expand(2, -1).clone()
    full[0, 0] = 3  # two different unpadded rows
    ref, margin = greedy_reference(d.model, full, NEW)
    assert margin > 1e-3  # the decoders are sharpened: no near-ties to flip
    assert torch.equal(generate(d.model, full, NEW), ref)
    new = generate(d.model, ids, NEW, attention_mask=mask)
    hf = d.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert new.shape == (2, NEW) and new.dtype == torch.long
    assert torch.equal(new, hf[:, ids.shape[1]:])


@torch.no_grad()
def test_greedy_grown_matches_recomputation(grown_decoder):
    """The heterogeneous grown model: cached greedy == uncached recomputation, batch of 2, one row left-padded
    (rope is relative, so the uncached graph's padded numbering gives the same tokens)."""
    ids, mask = prompt(grown_decoder.spec.vocab)
    ref, _ = greedy_reference(grown_decoder.model, ids, NEW, mask)
    assert torch.equal(generate(grown_decoder.model, ids, NEW, attention_mask=mask), ref)


def test_sampling_seeded(llama_decoder):
    """Same seed → same ids; another seed → other ids; a high temperature gives varied tokens; top_k = 1 and a
    tiny top_p are greedy."""
    m = llama_decoder.model
    ids, mask = prompt(llama_decoder.spec.vocab)
    greedy = generate(m, ids, 16, attention_mask=mask)
    hot = dict(attention_mask=mask, temperature=5.0)
    a = generate(m, ids, 16, seed=1, **hot)
    assert torch.equal(a, generate(m, ids, 16, seed=1, **hot))
    assert not torch.equal(a, generate(m, ids, 16, seed=2, **hot))
    assert (a != greedy).float().mean() > 0.5  # hot sampling leaves the greedy path
    firsts = {int(generate(m, ids, 1, seed=s, **hot)[1, 0]) for s in range(8)}
    assert len(firsts) >= 3, firsts  # and draws varied tokens from one distribution
    assert torch.equal(generate(m, ids, 16, attention_mask=mask, temperature=1.0, top_k=1, seed=3), greedy)
    assert torch.equal(generate(m, ids, 16, attention_mask=mask, temperature=1.0, top_p=1e-6, seed=3), greedy)


def test_next_tokens_distribution():
    """Sampling frequencies follow softmax(logits / T); top_k and top_p keep exactly the tokens they name."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(next_tokens(logits, 2.0, None, None, g), minlength=4).float() / 20000
    torch.testing.assert_close(counts, (logits[0] / 2.0).softmax(-1), atol=0.015, rtol=0)
    assert set(next_tokens(logits, 1.0, 2, None, g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, 0.03: the nucleus of 0.8 is the first two
    assert set(next_tokens(logits, 1.0, None, 0.8, g).tolist()) == {0, 1}
    assert set(next_tokens(logits, 1.0, None, float(p[:2].sum()) + 0.01, g).tolist()) == {0, 1, 2}
    assert torch.equal(next_tokens(logits[:2], 0.0, None, None, None), torch.tensor([0, 0]))


def test_eos_and_stream(llama_decoder):
    """A row that emits eos repeats it; generation stops when every row has; stream sees every step's ids."""
    m = llama_decoder.model
    ids, mask = prompt(llama_decoder.spec.vocab)
    greedy = generate(m, ids, 12, attention_mask=mask)
    stop = int(greedy[1, 3])  # row 1 ends at step 3 (or earlier, where the same id came before)
    first = int((greedy[1] == stop).nonzero()[0])
    seen = []
    out = generate(m, ids, 12, attention_mask=mask, eos=[stop], stream=lambda s, t: seen.append((s, t.clone())))
    assert out[1, first] == stop and (out[1, first:] == stop).all()
    row0 = (greedy[0] == stop).nonzero()
    end = max(first, int(row0[0]) if len(row0) else 11) + 1
    assert out.shape == (2, end)
    assert [s for s, _ in seen] == list(range(end))
    assert torch.equal(torch.stack([t for _, t in seen], 1), out)
    assert torch.equal(out[:, :first + 1], greedy[:, :first + 1])


def test_timings(gpt2_decoder):
    """A Generation: the new ids, prefill and decode times; tokens/s counts B × (N − 1) decode tokens."""
    ids, mask = prompt(gpt2_decoder.spec.vocab)
    run = generate_timed(gpt2_decoder.model, ids, 9, attention_mask=mask)
    assert isinstance(run, Generation) and run.steps == 9 and run.new_ids.shape == (2, 9)
    assert run.prefill_ms > 0 and run.decode_ms > 0
    assert run.tokens_per_s == pytest.approx(2 * 8 / (run.decode_ms / 1e3))
    assert generate_timed(gpt2_decoder.model, ids, 0).new_ids.shape == (2, 0)


def test_cached_shares_parameters(llama_decoder):
    """The cached form holds the very same parameter tensors (no copy), with the same parameter metadata;
    `build(cache=True)` makes one directly, and `mptc.generate` is the function."""
    m = llama_decoder.model
    c = cached(m)
    assert is_cached(c) and not is_cached(m) and cached(c) is c
    assert dict(c.named_parameters()).keys() == dict(m.named_parameters()).keys()
    assert all(c.get_parameter(k) is p for k, p in m.named_parameters())
    assert mptc.model.param_info(c) == mptc.model.param_info(m)
    roles = {n.meta["mptc"].role for n in m.graph.nodes}
    assert roles <= {n.meta["mptc"].role for n in c.graph.nodes}
    names = [n.name for n in c.graph.nodes if n.op == "placeholder"]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_key_0", "past_value_0", "past_key_1",
                     "past_value_1"]
    direct = build(llama_decoder.spec, m.state_dict(), cache=True).eval()
    ids, _ = prompt(llama_decoder.spec.vocab)
    with torch.no_grad():
        _close(direct(input_ids=ids)[0], m(input_ids=ids))
    assert torch.equal(mptc.generate(m, ids, 3), generate(m, ids, 3))


@torch.no_grad()
def test_cache_holds_rotated_kv_heads(llama_decoder):
    """Layer 0's cached keys are the key projection after rope, per kv head (G = 2, not H = 4), and its values
    the value projection: what an ONNX runtime's KV cache holds too."""
    m, spec = llama_decoder.model, llama_decoder.spec
    a, d = spec.layers[0].attention, spec.width
    ids = torch.tensor([[5, 17, 42, 9, 130]])
    _, presents = cached(m)(input_ids=ids)
    x = F.embedding(ids, m.get_parameter("embed.tokens.weight"))  # (1, 5, D)
    h = F.rms_norm(x, (d,), m.get_parameter("layers.0.attn_norm.weight"), spec.layers[0].norm.eps)
    k = F.linear(h, m.get_parameter("layers.0.attn.k.weight")).view(1, 5, a.kv_heads, a.head_dim).transpose(1, 2)
    v = F.linear(h, m.get_parameter("layers.0.attn.v.weight")).view(1, 5, a.kv_heads, a.value_dim).transpose(1, 2)
    k = ops.apply_rope(k, *ops.rope_tables(x, a.rotary, spec.embed.positions.theta))  # (1, G, 5, K)
    assert presents[0][0].shape == (1, 2, 5, 16)
    _close(presents[0][0], k)
    _close(presents[0][1], v)


def test_generate_from_model_dir(llama_decoder):
    """A model dir path is loaded and generated from like the model itself."""
    ids, mask = prompt(llama_decoder.spec.vocab)
    assert torch.equal(generate(str(llama_decoder.model_dir), ids, 4, attention_mask=mask),
                       generate(llama_decoder.model, ids, 4, attention_mask=mask))


FEATURES = """
model feat_lm {
  vocab = 64
  context = 32
  width = 32
  embed { positions = sinusoidal, adaptive = film(hidden = 8), types { text = 40, code = 24 } }
  layers 3 {
    norm = layernorm(eps = 1e-5)
    placement = [pre, post, pre]
    modulate = true
    attention { heads = 4, kv_heads = [2, 1, 4], head_dim = [8, 8, 4], value_dim = [8, 4, 8], window = [none, 3, 5],
                qk_norm = rmsnorm(eps = 1e-6) }
    mlp { hidden = [48, 32, 40], activation = gelu }
  }
  head lm { norm = layernorm(eps = 1e-5), tied = false, transform = dense(activation = gelu, norm = none) }
}
"""


ROTARY = """
model rotary_lm {
  vocab = 64
  context = 32
  width = 32
  embed { positions = rope(theta = 500.0), dropout = 0.1, experts = moe(count = 3, gate = token, top = 2) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    dropout = 0.1
    attention { heads = 4, kv_heads = [1, 2], head_dim = 8, rotary_dim = [4, 8], dropout = 0.1, bias = false }
    mlp { hidden = 48, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}
"""


GEMMA = """
model gemma_like {
  vocab = 64
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0, scaling = linear(factor = 2.0)), scale = sqrt_width }
  layers 3 {
    norm = rmsnorm(eps = 1e-6)
    placement = [sandwich, output, sandwich]
    attention { heads = 4, kv_heads = 2, head_dim = 8, bias = false, softcap = [5.0, none, 3.0], scale = 0.3,
                window = [4, none, 4], qk_norm = rmsnorm(eps = 1e-6), rope = [rope(theta = 100.0), none, none] }
    mlp { hidden = 48, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true, softcap = 4.0 }
}
"""

MOE = """
model moe_like {
  vocab = 64
  context = 32
  width = 32
  embed { positions = rope(theta = 500000.0, scaling = llama3(factor = 8.0, low = 1.0, high = 4.0, original = 4)) }
  layers 2 {
    norm = layernorm(eps = 1e-5)
    parallel = [true, false]
    attention { heads = 4, kv_heads = 4, head_dim = 8, qk_norm = rmsnorm(eps = 1e-6), qk_norm_over = all }
    mlp { hidden = 24, activation = swiglu, bias = false, experts = [4, none], top_k = [2, none] }
  }
  head lm { norm = layernorm(eps = 1e-5), tied = false }
}
"""

YARN = """
model yarn_like {
  vocab = 64
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 4)) }
  layers 1 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 2, head_dim = 16, bias = false }
    mlp { hidden = 24, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}
"""


@torch.no_grad()
@pytest.mark.parametrize("text, shapes", [
    (FEATURES, [(2, 10, 8, 8), (1, 10, 8, 4), (4, 10, 4, 8)]),
    (ROTARY, [(1, 10, 8, 8), (2, 10, 8, 8)]),
    (GEMMA, [(2, 10, 8, 8)] * 3),
    (MOE, [(4, 10, 8, 8)] * 2),
    (YARN, [(2, 10, 16, 16)]),
], ids=["sinusoidal-types-film-post-window", "partial-rotary-experts-dropout", "gemma-softcaps-sandwich-layer-rope",
        "moe-parallel-llama3-qknorm-all", "yarn"])
def test_cached_features_spec(text, shapes):
    """The features the cache serves: sinusoidal positions, token types with modulation, adaptive FiLM, post-norm,
    q/k norm, windows, per-layer head sizes (K ≠ Dv); partial rotary, token-gated expert embeddings, dropout (eval);
    Gemma's embedding scale, sandwich and output norms, score and logit soft-caps, attention scale, per-layer rope,
    linear scaling, geglu_tanh; a mixture-of-experts MLP, a parallel layer, q/k norm over all heads, llama3 and
    yarn scaling: through the cache one token at a time equals the uncached forward, and each layer's cache is
    (G_i, P, K_i) and Dv_i."""
    model = perturbed(mptc.parse(text))
    step = cached(model)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids)
    logits, presents = step(input_ids=ids[:, :1])
    outs = [logits]
    for j in range(1, 10):
        logits, presents = step(input_ids=ids[:, j:j + 1], **_past(presents))
        outs.append(logits)
    _close(torch.cat(outs, 1), ref)
    assert [tuple(k.shape[1:]) + (v.shape[-1],) for k, v in presents] == shapes


@torch.no_grad()
def test_cached_nested_follows_granularity():
    """A nested model's cached form shares its Nest module: under granularity(model, …) it runs the chosen
    sub-network (a smaller MLP, half the kv heads, a skipped layer), equal to the uncached forward."""
    model = perturbed(mptc.load(ROOT / "tests" / "specs" / "nested-lm.mpt"))
    step = cached(model)
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    for choice, kv in [({}, 2), (dict(mlp="s", heads="l", skip=[1]), 1)]:
        with granularity(model, **choice):
            ref = model(input_ids=ids)
            logits, presents = step(input_ids=ids[:, :3])
            outs = [logits]
            for j in range(3, 8):
                logits, presents = step(input_ids=ids[:, j:j + 1], **_past(presents))
                outs.append(logits)
            _close(torch.cat(outs, 1), ref)
            assert {k.shape[1] for k, _ in presents} == {kv}
            assert torch.equal(generate(model, ids, 4), greedy_reference(model, ids, 4)[0])


def test_refuses_encoders_and_tasks():
    """Encoders and models with features the cache does not serve are refused by name, at build time and by
    generate."""
    bert = mptc.load(ROOT / "tests" / "specs" / "tiny-bert.mpt")
    with pytest.raises(MptcError, match=r"model 'tiny_bert' cannot run with a KV cache: it has `head classify` "
                                        r"\(not a language-model head\)"):
        build(bert, cache=True)
    with pytest.raises(MptcError, match="cannot run with a KV cache: it has `head classify`"):
        generate(build(bert), torch.zeros(1, 3, dtype=torch.long), 2)
    nested = mptc.load(ROOT / "tests" / "specs" / "nested-lm.mpt")
    with pytest.raises(MptcError, match=r"it has tasks \(tasks\) \(cut one sub-network out first with `mptc "
                                        r"extract`\)"):
        cached(build(nested.replace(tasks=(Task("fast", mix="s"),))))
    cond = mptc.load(ROOT / "examples" / "mpt-moe-embed.mpt")
    with pytest.raises(MptcError, match=r"it has conditions \(conditions\)"):
        build(cond, cache=True)


@pytest.mark.parametrize("scaling", ["dynamic(factor = 2.0, original = 8)",
                                     "longrope(factor = 2.0, original = 8, short = [1.0] * 8, long = [2.0] * 8)"])
def test_refuses_length_dependent_rope(scaling):
    """Rope scalings that follow the sequence length would leave the cached keys stale: refused by name."""
    spec = mptc.parse(YARN.replace("yarn(factor = 4.0, original = 4)", scaling))
    kind = scaling.split("(")[0]
    with pytest.raises(MptcError, match=rf"it has {kind} rope scaling \(layer 0\): its frequencies follow the "
                                        "sequence length"):
        build(spec, cache=True)


def test_refuses_bidirectional_lm():
    """A decoder with one bidirectional layer is refused, naming the layer."""
    spec = mptc.load(ROOT / "tests" / "specs" / "tiny-gpt2.mpt")
    one = replace(spec.layers[1], attention=replace(spec.layers[1].attention, mask="bidirectional"))
    with pytest.raises(MptcError, match=r"bidirectional attention \(`mask = bidirectional` in layer 1\)"):
        build(spec.replace(layers=(spec.layers[0], one, *spec.layers[2:])), cache=True)


def test_refuses_too_long_context(gpt2_decoder):
    """Learned positions: the prompt and the new tokens must fit in `context` (64)."""
    ids = torch.ones(1, 40, dtype=torch.long)
    with pytest.raises(MptcError, match=r"a prompt of 40 positions and 32 new tokens need 72 positions, but model "
                                        r"'gpt2' has context = 64 \(learned positions\)") as e:
        generate(gpt2_decoder.model, ids, 32)
    assert e.value.hint == "shorten the prompt or generate at most 24 tokens"
    assert generate(gpt2_decoder.model, ids, 24).shape == (1, 24)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=torch.ones(3, dtype=torch.long)), r"integer tensor \(B, T\), got a 1-d int64 tensor"),
    (dict(ids=torch.full((1, 3), 256)), "prompt id 256 is out of range: model 'llama' has vocab = 256"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "attention_mask row 0 has padding after a token"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), r"must have the prompt's shape \(1, 3\), got \(1, 4\)"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a whole number ≥ 0, got -1"),
    (dict(temperature=-0.5), "temperature must be a finite number ≥ 0, got -0.5"),
    (dict(top_k=0), "top_k must be a whole number ≥ 1, got 0"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\], got 1.5"),
    (dict(eos=999), "eos must be token ids in 0..255, got 999"),
])
def test_refuses_bad_arguments(llama_decoder, kwargs, message):
    """Each bad prompt, mask or option is an MptcError naming it."""
    args = dict(ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2) | kwargs
    with pytest.raises(MptcError, match=message):
        generate(llama_decoder.model, args.pop("ids"), args.pop("max_new_tokens"), **args)

"""Extraction from any model: taylor scores, least-squares correction, plain-model cuts, per-layer
widths, and reports that replay as pass text."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mptc
from mptc import passes as P
from mptc.cli import main
from mptc.passes.correct import refit
from mptc.passes.scores import lm_loss, masked, mean_loss
from mptc.search import Budget, plain_search

SPECS = Path(__file__).parent / "specs"
LLAMA = SPECS / "tiny-llama.mpt"  # 3 layers, width 64, 8 heads in 2 kv groups, SwiGLU 96, vocab 1000

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0):
    return mptc.build(mptc.load(LLAMA), seed=seed).eval()


def _batches(n: int = 2, seed: int = 0, batch: int = 4, seq: int = 16, like=None):
    """Random token batches; with `like`, each continued greedily by that model from its first token, so
    the model predicts them well and any change to its function raises their loss."""
    spec = mptc.load(LLAMA)
    out = [mptc.example_inputs(spec, batch=batch, seq=seq, seed=seed + s) for s in range(n)]
    if like is not None:
        with torch.no_grad():
            for b in out:
                for t in range(seq - 1):
                    b["input_ids"][:, t + 1] = like(**b)[:, t].argmax(-1)
    return out


def _sharp(model):
    """The model with a peaked output head (its greedy continuations have a low loss)."""
    with torch.no_grad():
        model.get_parameter("head.out.weight").mul_(20.0)
    return model


# --- taylor scores ------------------------------------------------------------------------


def test_reorder_by_taylor_ranks_a_constructed_case():
    """Layer 1 keeps only MLP units 40, 7 and 63 and only head 5 (kv group 1): every other unit and
    head has zero weights, so a zero |w · grad|. The three units come first, in the order of an
    independent autograd computation of sum |w · dL/dw| over each unit's up, gate and down weights."""
    model = _model()
    cal = _batches()
    live = [40, 7, 63]
    with torch.no_grad():
        p = "layers.1.mlp"
        dead = torch.ones(96, dtype=torch.bool)
        dead[live] = False
        for name, axis in (("up", 0), ("gate", 0), ("down", 1)):
            model.get_parameter(f"{p}.{name}.weight").data.index_fill_(axis, dead.nonzero().flatten(), 0.0)
        o = model.get_parameter("layers.1.attn.o.weight").data.view(64, 8, 12)
        o[:, [h for h in range(8) if h != 5]] = 0.0
    ws = {n: model.get_parameter(f"layers.1.mlp.{n}.weight") for n in ("up", "gate", "down")}
    grads = {n: torch.zeros_like(w) for n, w in ws.items()}
    for b in cal:
        g = torch.autograd.grad(lm_loss(model, b), list(ws.values()))
        for n, gi in zip(ws, g, strict=True):
            grads[n] += gi
    score = ((ws["up"] * grads["up"]).abs().sum(1) + (ws["gate"] * grads["gate"]).abs().sum(1)
             + (ws["down"] * grads["down"]).abs().sum(0)).detach()
    want = sorted(live, key=lambda u: -float(score[u]))
    assert len({round(float(score[u]), 12) for u in live}) == 3  # a strict order to find

    new, report = P.Pipeline([P.reorder(by="taylor", calibration=cal)])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9
    up_old, up_new = model.get_parameter("layers.1.mlp.up.weight"), new.get_parameter("layers.1.mlp.up.weight")
    for pos, unit in enumerate(want):
        torch.testing.assert_close(up_new[pos], up_old[unit], rtol=0, atol=0)
    assert up_new[3:].abs().sum() == 0  # the dead units rank last
    q_old = model.get_parameter("layers.1.attn.q.weight").view(8, 12, 64)
    q_new = new.get_parameter("layers.1.attn.q.weight").view(8, 12, 64)
    torch.testing.assert_close(q_new[0], q_old[5], rtol=0, atol=0)  # its group moved first and it leads it
    k_old = model.get_parameter("layers.1.attn.k.weight").view(2, 12, 64)
    torch.testing.assert_close(new.get_parameter("layers.1.attn.k.weight").view(2, 12, 64)[0], k_old[1])
    assert r.notes == ["calibration data: batches given from Python, 128 tokens in 8 windows"]
    assert "calibration" not in r.call and "tensor(" not in r.call


def test_taylor_needs_a_next_token_loss():
    model = mptc.build(mptc.load(SPECS / "tiny-bert.mpt"), seed=0).eval()
    cal = [mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8)]
    with pytest.raises(mptc.MptcError, match="this score needs a next-token loss, and model 'tiny_bert' has a "
                       "classify head"):
        P.Pipeline([P.reorder(by="taylor", calibration=cal)])(model)


# --- any model ------------------------------------------------------------------------------


def test_extract_half_mlp_of_a_plain_model_is_verified(tmp_path, capsys):
    src = str(LLAMA)
    assert main(["extract", src, "--mlp", "0.5", "-o", str(tmp_path / "half")]) == 0
    out = capsys.readouterr().out
    assert "equals the parent at that granularity" in out
    sub = mptc.load_model(tmp_path / "half").eval()
    assert [ly.mlp.hidden for ly in mptc.spec_of(sub).layers] == [48, 48, 48]
    parent = mptc.load_model(src).eval()
    x = mptc.example_inputs(mptc.spec_of(parent), batch=2, seq=9, seed=3)
    with torch.no_grad(), masked(parent, {i: (48, None, False) for i in range(3)}):
        want = parent(**x)
    with torch.no_grad():
        torch.testing.assert_close(sub(**x), want, rtol=0, atol=1e-5)
        assert (parent(**x) - want).abs().max() > 1e-3  # the cut parts mattered


def test_extract_kv_groups_mix_fractions_and_dropped_layers_of_a_plain_model():
    model = _model()
    sub, report = P.Pipeline([P.extract(mix="0.25,1/2,1", kv_groups=1, drop_layers=[1])])(model)
    s = mptc.spec_of(sub)
    assert [ly.mlp.hidden for ly in s.layers] == [24, 96]
    assert [(ly.attention.heads, ly.attention.kv_heads) for ly in s.layers] == [(4, 1), (4, 1)]
    assert report.passes[0].max_abs_error_float64 <= 1e-9
    assert mptc.summarize(s).params == sum(p.numel() for p in sub.parameters())
    with pytest.raises(mptc.MptcError, match="kv_groups = 3, but layer 0 has 2 kv groups"):
        P.Pipeline([P.extract(kv_groups=3)])(model)
    with pytest.raises(mptc.MptcError, match="layer 0: MLP fraction 0.001 of 96 units keeps none"):
        P.Pipeline([P.extract(mlp="0.001")])(model)
    with pytest.raises(mptc.MptcError, match=r"MLP fraction '1\.5' must be a number in \(0, 1\]"):
        P.Pipeline([P.extract(mlp="1.5")])(model)


MOE = """
model moe {
  vocab = 96
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, bias = false }
    mlp { hidden = 24, activation = swiglu, bias = false, experts = 4, top_k = 2, shared = 16, shared_gate = true }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""


def _expert_norms(model, i: int) -> torch.Tensor:
    """(E, F): each expert unit's group L2 norm (its up and gate rows and its down column), written out."""
    w = {k: model.get_parameter(f"layers.{i}.mlp.experts.{k}.weight").detach().double() for k in ("up", "gate",
                                                                                                    "down")}
    return ((w["up"] ** 2).sum(2) + (w["gate"] ** 2).sum(2) + (w["down"] ** 2).sum(1)).sqrt()


@pytest.mark.parametrize("by", ["weight", "activation", "taylor"])
def test_reorder_and_extract_cut_every_expert_of_a_mixture(by):
    """Each expert of a mixture is ranked on its own (its own permutation), and `mlp = 0.5` keeps every
    expert's first half and the shared expert's first half: the result equals the ranked parent with the cut
    units' down-projection columns zeroed (written out here, not through the pass's own reference)."""
    model = mptc.build(mptc.parse(MOE), seed=0).eval()
    cal = [mptc.example_inputs(mptc.spec_of(model), batch=4, seq=16, seed=s) for s in range(2)]
    ranked, rep = P.Pipeline([P.reorder(by=by, what="mlp", calibration=cal)])(model)
    assert rep.passes[0].max_abs_error_float64 <= 1e-9
    if by == "weight":
        for i in range(2):
            norms = _expert_norms(ranked, i)  # (E, F): descending within each expert
            assert bool((norms[:, :-1] >= norms[:, 1:] - 1e-12).all())
            perms = [torch.argsort(n, descending=True) for n in _expert_norms(model, i)]
            assert any(not torch.equal(perms[0], p) for p in perms[1:])  # the experts' orders differ
    sub, rep = P.Pipeline([P.extract(mlp="0.5")])(ranked)
    m = mptc.spec_of(sub).layers[0].mlp
    assert (m.hidden, m.shared, m.experts) == (12, 8, 4)
    assert mptc.summarize(mptc.spec_of(sub)).params == sum(p.numel() for p in sub.parameters())
    want = copy.deepcopy(ranked).double()
    with torch.no_grad():
        for i in range(2):
            want.get_parameter(f"layers.{i}.mlp.experts.down.weight")[:, :, 12:] = 0
            want.get_parameter(f"layers.{i}.mlp.shared.down.weight")[:, 8:] = 0
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=9, seed=3)
    with torch.no_grad():
        got, ref, whole = copy.deepcopy(sub).double()(**x), want(**x), ranked.double()(**x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    assert (whole - ref).abs().max() > 1e-3  # the cut units mattered


def test_extract_of_a_mixture_refuses_the_dense_refit_and_the_per_layer_search():
    model = mptc.build(mptc.parse(MOE), seed=0).eval()
    with pytest.raises(mptc.MptcError, match="layer 0's MLP is a mixture of experts; correct = lsq refits a dense "
                                             "MLP's down projection"):
        P.Pipeline([P.extract(mlp="0.5", correct="lsq", calibration=_batches())])(model)
    with pytest.raises(mptc.MptcError, match="layer 0's MLP is a mixture of experts: the per-layer search sizes "
                                             "dense MLPs") as e:
        plain_search(model, Budget("params", 1000), [mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8)])
    assert "mptc extract --mlp F" in e.value.hint


def test_drop_least_leaves_out_the_layer_whose_removal_costs_least():
    """Layer 2's branches are silenced (zero output projections), so leaving it out changes nothing:
    its measured loss is the parent's. The layer left out is the one of least measured loss, and the
    result equals the parent with that layer silenced."""
    model = _model()
    cal = _batches()
    with torch.no_grad():
        model.get_parameter("layers.2.attn.o.weight").zero_()
        model.get_parameter("layers.2.mlp.down.weight").zero_()
    sub, report = P.Pipeline([P.extract(drop_least=1, calibration=cal)])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and mptc.spec_of(sub).n_layers == 2
    note = next(n for n in r.notes if n.startswith("calibration loss with each layer alone left out: "))
    losses = {int(k): float(v) for k, v in (kv.split(": ") for kv in note.split("left out: ")[1].split(", "))}
    assert abs(losses[2] - mean_loss(model, cal)) < 1e-4
    dropped = min(losses, key=losses.get)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8, seed=5)
    with torch.no_grad(), masked(model, {dropped: (None, None, True)}):
        want = model(**x)
    with torch.no_grad():
        torch.testing.assert_close(sub(**x), want, rtol=0, atol=1e-5)


# --- least-squares correction ----------------------------------------------------------------


def _duplicated():
    """A model whose MLP units 48..95 copy units 0..47 (up and gate rows), so the kept half computes
    every hidden activation: the refit can fold each dropped down column into its twin exactly."""
    model = _model()
    with torch.no_grad():
        for i in range(3):
            for n in ("up", "gate"):
                w = model.get_parameter(f"layers.{i}.mlp.{n}.weight")
                w[48:] = w[:48]
            model.get_parameter(f"layers.{i}.mlp.down.weight").mul_(4.0)  # so the MLPs matter
    return _sharp(model)


def test_lsq_correction_lowers_held_out_loss_and_says_so():
    model = _duplicated()
    cal, held = _batches(4, seed=0), _batches(2, seed=10, like=model)
    plain, _ = P.Pipeline([P.extract(mlp="0.5")])(model)
    fixed, report = P.Pipeline([P.extract(mlp="0.5", correct="lsq", ridge=1e-8, calibration=cal,
                                          held_out=held)])(model)
    parent, before, after = mean_loss(model, held), mean_loss(plain, held), mean_loss(fixed, held)
    assert after < before - 0.01 and abs(after - parent) < 1e-4, (parent, before, after)
    down = model.get_parameter("layers.0.mlp.down.weight")
    torch.testing.assert_close(fixed.get_parameter("layers.0.mlp.down.weight"), down[:, :48] + down[:, 48:],
                               rtol=1e-3, atol=1e-4)
    r = report.passes[0]
    claims = {t["tensor"]: t["claims"] for t in r.tensors}
    assert claims["layers.0.mlp.down.weight"] == [
        "refit by ridge least squares on 256 calibration tokens (kept inputs of layers.0.mlp.down.weight)"]
    assert claims["layers.0.mlp.up.weight"] == ["axis 0: slice keeping 48 of 96"]  # still checked exactly
    assert f"held-out loss {before:.4f} before the refit, {after:.4f} after" in r.notes


def test_lsq_refuses_a_refit_that_raises_the_held_out_loss():
    model = _duplicated()
    with pytest.raises(P.CheckFailed, match="the least-squares refit raised the held-out loss from"):
        P.Pipeline([P.extract(mlp="0.5", correct="lsq", ridge=1e9, calibration=_batches(),
                              held_out=_batches(1, seed=9, like=model))])(model)
    with pytest.raises(P.PassError, match="correct = lsq and merge_kv check the result on held-out data"):
        P.Pipeline([P.extract(mlp="0.5", correct="lsq", calibration=_batches())])(model)


def test_refit_solves_the_ridge_normal_equations():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = refit(w, h.T @ h, 4, 0.0)
    want = torch.linalg.lstsq(h[:, :4], h @ w.T).solution.T  # (3, 4)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_lsq_corrects_the_attention_output_when_kv_groups_are_cut():
    model = _model()
    with torch.no_grad():  # group 1's query heads (4..7) copy group 0's, and k/v too
        for n, per in (("q", 4 * 12), ("k", 12), ("v", 12)):
            w = model.get_parameter(f"layers.0.attn.{n}.weight")
            w[per:] = w[:per]
        model.get_parameter("layers.0.attn.o.weight").mul_(4.0)
    held = _batches(2, seed=10, like=_sharp(model))
    plain, _ = P.Pipeline([P.extract(kv_groups=1)])(model)
    fixed, _ = P.Pipeline([P.extract(kv_groups=1, correct="lsq", ridge=1e-8, calibration=_batches(4),
                                     held_out=held)])(model)
    assert mean_loss(fixed, held) < mean_loss(plain, held)
    o = model.get_parameter("layers.0.attn.o.weight")
    torch.testing.assert_close(fixed.get_parameter("layers.0.attn.o.weight"), o[:, :48] + o[:, 48:],
                               rtol=1e-3, atol=1e-4)


def test_merge_kv_keeps_every_query_head_and_averages_kv_groups():
    """kv groups 0 and 1 of every layer have the same k and v projections, so merging them changes
    nothing: the merged model equals the parent, and beats dropping a group with its heads."""
    model = _sharp(_model())
    with torch.no_grad():
        for i in range(3):
            for n in ("k", "v"):
                w = model.get_parameter(f"layers.{i}.attn.{n}.weight")
                w[12:] = w[:12]
    held = _batches(2, seed=10, like=model)
    merged, report = P.Pipeline([P.extract(kv_groups=1, merge_kv=True, held_out=held)])(model)
    a = mptc.spec_of(merged).layers[0].attention
    assert (a.heads, a.kv_heads) == (8, 1)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x), model(**x), rtol=1e-5, atol=1e-4)
    r = report.passes[0]
    claims = {t["tensor"]: t["claims"] for t in r.tensors}
    assert claims["layers.0.attn.k.weight"] == ["mean of each 2 consecutive kv groups of layers.0.attn.k.weight"]
    assert any(n.startswith("held-out loss ") and "with kv groups merged" in n for n in r.notes)
    with pytest.raises(P.PassError, match="merge_kv merges kv groups down to kv_groups"):
        P.Pipeline([P.extract(merge_kv=True, mlp="0.5")])(model)


# --- per-layer widths -----------------------------------------------------------------------


def test_plain_search_fits_the_budget_and_cuts_where_it_costs_least(tmp_path, capsys):
    """Layer 0's MLP is silenced, so cutting it is free: the search takes all it can there first."""
    model = _sharp(_model())
    with torch.no_grad():
        model.get_parameter("layers.0.mlp.down.weight").zero_()
        for i in (1, 2):  # and the others' large, so that any cut there costs
            model.get_parameter(f"layers.{i}.mlp.down.weight").mul_(10.0)
    full = mptc.summarize(mptc.spec_of(model)).params
    budget = Budget("params", full - 3 * 64 * 72)  # 72 units' worth of up, gate and down
    r = plain_search(model, budget, _batches(1, like=model), step=1 / 8)
    assert r.params <= budget.limit and r.units[0] == 24 and r.units[1:] == (96, 96), r
    assert r.mix == "24/96,1,1"
    sub, rep = P.Pipeline([P.extract(mix=r.mix)])(model)
    assert mptc.summarize(mptc.spec_of(sub)).params == r.params and rep.passes[0].max_abs_error_float64 <= 1e-9


def test_plain_search_with_the_refit_chooses_widths_for_the_corrected_model():
    """Layer 1's last 48 MLP units copy its first 48 (same up and gate rows), so a refit folds their down
    columns into the kept ones and cutting them costs ~nothing; silenced without a refit they cost. The
    search with the refit cuts there; without it, its loss rises far more. The weights are left as they were."""
    model = _sharp(_model())
    with torch.no_grad():
        for k in ("up", "gate"):
            w = model.get_parameter(f"layers.1.mlp.{k}.weight")
            w[48:] = w[:48]
        for i in (0, 2):
            model.get_parameter(f"layers.{i}.mlp.down.weight").mul_(10.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = _batches(1, like=model)
    base = mean_loss(model, cal)
    budget = Budget("params", mptc.summarize(mptc.spec_of(model)).params - 3 * 64 * 48)
    fitted = plain_search(model, budget, cal, step=1 / 8, refit_ridge=1e-6)
    plain = plain_search(model, budget, cal, step=1 / 8)
    assert fitted.units == (96, 48, 96) and fitted.params <= budget.limit, fitted
    assert fitted.loss - base < 1e-3 < plain.loss - base, (base, fitted.loss, plain.loss)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    sub, _ = P.Pipeline([P.extract(mix=fitted.mix, correct="lsq", ridge=1e-6, calibration=cal, held_out=cal)])(model)
    assert mean_loss(sub, cal) == pytest.approx(fitted.loss, abs=1e-4)


# --- reports replay as pass text, calibration recorded and never printed ----------------------

REPLAY = {
    "grow_mlp": "grow_mlp(hidden = 128, layers = [0, 2], init = normal(std = 0.01))",
    "add_heads": "add_heads(n = 2, layers = 1)",
    "grow_head_dim": "grow_head_dim(value = 16)",
    "grow_qk": "grow_qk(dim = 16)",
    "grow_width": "grow_width(factor = 2.0)",
    "add_layers": "add_layers(n = 1, at = 1)",
    "add_kv_heads": "add_kv_heads(n = 2)",
    "grow_vocab": "grow_vocab(vocab = 1024, init = zeros)",
    "grow_context": "grow_context(context = 96)",
    "upcycle_moe": "upcycle_moe(experts = 2, top_k = 1, layers = [0], noise = 0.01)",
    "extract": 'extract(mix = "0.5,1/4,1", kv_groups = 1)',
    "reorder": "reorder(by = taylor, data = stdlib, samples = 4, seed = 3)",
}


def test_every_pass_is_in_the_replay_list():
    assert set(REPLAY) >= set(P.PASSES)


@pytest.mark.parametrize("name", sorted(REPLAY))
def test_report_call_replays_with_p(name, tmp_path, capsys):
    if name not in P.PASSES:
        pytest.skip(f"{name} is not registered")
    src = str(LLAMA)
    assert main(["grow", src, "-p", REPLAY[name], "-o", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    call = json.loads((tmp_path / "a" / "report.json").read_text())["passes"][0]["call"]
    assert main(["grow", src, "-p", call, "-o", str(tmp_path / "b")]) == 0, (call, capsys.readouterr().err)
    a, b = load_file(tmp_path / "a" / "weights.safetensors"), load_file(tmp_path / "b" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), call
    assert mptc.load(tmp_path / "a") == mptc.load(tmp_path / "b")


def test_cli_reorder_reads_stdlib_and_records_it(tmp_path, capsys):
    src = str(LLAMA)
    assert main(["reorder", src, "--by", "activation", "--data", "stdlib", "--samples", "8",
                 "-o", str(tmp_path / "r")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tensor(" not in out and len(out) < 600, out
    assert "calibration data: stdlib (training part), 512 tokens in 8 windows, seed 0" in out
    text = (tmp_path / "r" / "report.json").read_text()
    rep = json.loads(text)["passes"][0]
    assert rep["call"] == "reorder(by = activation, what = both, data = [stdlib], samples = 8, seed = 0)"
    assert rep["notes"] == ["calibration data: stdlib (training part), 512 tokens in 8 windows, seed 0"]
    assert "input_ids" not in text and len(text) < 20_000
    assert main(["reorder", src, "--by", "taylor", "-o", str(tmp_path / "x")]) == 1
    assert "--by taylor needs --data FILES" in capsys.readouterr().err

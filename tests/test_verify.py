"""The verification machinery: selections, tensor sharing, the kept-tensor check, the float64
run without a float64 copy (Upcast) and the exact values of scaled tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mptc
from mptc import passes as P
from mptc.passes import verify as V
from mptc.passes.engine import grouped_grow_map, grow_map, kept_entries, put, take

from .conftest import TINY, perturbed, tiny

SPECS = TINY[0].parent


def test_kept_entries_are_slices_for_runs_and_indices_otherwise():
    new_sel, old_sel = kept_entries([grow_map(3, 5), None, grouped_grow_map(2, 2, 3)])
    assert new_sel[:2] == [slice(0, 3), slice(None)] and old_sel[:2] == [slice(0, 3), slice(None)]
    assert new_sel[2].tolist() == [0, 1, 3, 4] and old_sel[2].tolist() == [0, 1, 2, 3]
    new_sel, old_sel = kept_entries([torch.tensor([2, 0, 1])])  # a permutation
    assert new_sel[0].tolist() == [0, 1, 2] and old_sel[0].tolist() == [2, 0, 1]


@pytest.mark.parametrize("maps", [
    [grow_map(3, 5), grow_map(4, 6)],  # slices only
    [torch.tensor([1, -1, 0]), grow_map(4, 6)],  # one gathered axis
    [torch.tensor([1, -1, 0]), torch.tensor([3, 0, -1, 2, 1])],  # an open mesh over two
])
def test_take_and_put_place_old_entries_where_the_maps_say(maps):
    old = torch.randn(3, 4)
    shape = tuple(len(m) for m in maps)
    new = torch.full(shape, float("nan"))
    new_sel, old_sel = kept_entries(maps)
    put(new, new_sel, take(old, old_sel))
    for i, a in enumerate(maps[0].tolist()):
        for j, b in enumerate(maps[1].tolist()):
            if a >= 0 and b >= 0:
                assert new[i, j] == old[a, b]
            else:
                assert new[i, j].isnan()
    assert torch.equal(take(new, new_sel), take(old, old_sel))


@pytest.mark.parametrize("p", [P.grow_width(width=80), P.grow_mlp(hidden=100, layers=[1]), P.add_heads(n=2),
                               P.add_layers(n=1, at=1)], ids=str)
def test_the_checks_do_not_change_the_result(p):
    model = tiny("llama")
    checked, _ = P.Pipeline([p])(model)
    plain, _ = P.Pipeline([p], check=False)(model)
    torch.testing.assert_close(checked.state_dict(), plain.state_dict(), rtol=0, atol=0)


def test_unchanged_tensors_are_shared_not_copied():
    model = tiny("llama")
    new, report = P.Pipeline([P.grow_mlp(hidden=100, layers=[1])])(model)
    changed = {t["tensor"] for t in report.passes[0].tensors}
    assert changed == {f"layers.1.mlp.{w}.weight" for w in ("up", "gate", "down")}
    old_sd, new_sd = model.state_dict(), new.state_dict()
    for name, t in new_sd.items():
        assert (t.data_ptr() == old_sd[name].data_ptr()) == (name not in changed), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_pass_keeps_the_model_s_dtype(dtype):
    model = tiny("llama").to(dtype)
    new, report = P.Pipeline([P.grow_mlp(hidden=100), P.add_heads(n=2)])(model)
    assert {p.dtype for p in new.parameters()} == {dtype}
    assert all(r.max_abs_error_float64 == 0 and r.max_abs_error_float32 == 0 for r in report.passes)
    assert new.get_parameter("embed.tokens.weight").data_ptr() == model.get_parameter("embed.tokens.weight").data_ptr()


def test_a_tensor_changed_without_a_claim_is_caught(monkeypatch):
    import mptc.passes.engine as E

    real = E.remap

    def tampered(model, change):
        new, cert = real(model, change)
        with torch.no_grad():  # a new tensor in place of a kept one, one entry off
            w = new.get_parameter("embed.tokens.weight").detach().clone()
            w[0, 0] += 1e-3
            new.get_parameter("embed.tokens.weight").data = w
        return new, cert

    monkeypatch.setattr("mptc.passes.base.remap", tampered)
    with pytest.raises(P.PassError, match="embed.tokens.weight: claimed unchanged from embed.tokens.weight, but "
                                          "it differs"):
        P.Pipeline([P.grow_mlp(hidden=100)])(tiny("llama"))


def _specs() -> dict[str, mptc.Spec]:
    from .test_mpt import FEATURES, variant

    out = {p.stem: mptc.load(p) for p in [*TINY, SPECS / "nested-lm.mpt", SPECS / "nested-vit.mpt"]}
    return out | {f"mpt-{k}": variant(*v) for k, v in FEATURES.items()}


@pytest.mark.parametrize("name", sorted(_specs()))
def test_upcast_runs_like_a_float64_copy(name, monkeypatch):
    """Every op of every kind of model, with (nearly) every parameter taking the large-tensor
    path: gathered by embeddings, sliced in linear layers, widened whole anywhere else."""
    monkeypatch.setattr(V, "PIECE", 100)
    spec = _specs()[name]
    model = perturbed(spec)
    wide = {k: v.double() for k, v in model.state_dict().items()}
    copy64 = mptc.build(spec, weights=wide, dtype=torch.float64).eval()
    x = mptc.example_inputs(spec, batch=2, seq=9, seed=3, padded=True)
    x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}  # pixels, conditions
    run = V.Upcast(model, torch.float64)
    with torch.no_grad():
        got, want = run(**x), copy64(**x)
    assert got.dtype == torch.float64 and run._large  # the large-tensor path was taken
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


def test_the_float64_check_sees_the_rule_not_its_rounding():
    model = tiny("llama")
    new, cert = P.grow_width(width=72).apply(model)  # RMSNorm gains × √(64/72), rounded to float32
    x = V.probes(mptc.spec_of(model))
    exact = V.exact_values(model, new, cert)
    assert {n for n in exact} == {c.name for c in cert.claims if c.scale != 1.0} and exact
    rounded = V.max_error(model, new, x, torch.float64)
    assert 1e-9 < rounded < 1e-5  # float32 rounding of the gains, visible in float64
    assert V.max_error(model, new, x, torch.float64, exact=exact) <= 1e-12


def test_one_probe_batch_has_an_unpadded_and_padded_rows():
    (x,) = V.probes(mptc.spec_of(tiny("llama")))
    mask = x["attention_mask"]
    assert mask.shape == (2, 8) and bool(mask[0].all()) and 0 < int(mask[1].sum()) < 8


@pytest.mark.parametrize("first,runs", [(P.grow_mlp(hidden=100), 6), (P.grow_width(width=72), 7)], ids=str)
def test_a_pipeline_hands_each_checked_model_s_outputs_to_the_next_check(first, runs, monkeypatch):
    """Pass 2's old model is pass 1's new one: its probe outputs are reused, except float64 ones
    computed with exact (unrounded) scaled tensors, which are not the rounded model's."""
    from mptc.passes import pipeline as PL

    calls = []
    real = PL.outputs

    def counted(model, inputs, dtype, reference=None, exact=None):
        calls.append((dtype, bool(exact)))
        return real(model, inputs, dtype, reference, exact)

    monkeypatch.setattr(PL, "outputs", counted)
    _, report = P.Pipeline([first, P.add_heads(n=2)])(tiny("llama"))
    assert len(calls) == runs  # 4 for the first pass, 2 or 3 for the second
    assert all(r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5 for r in report.passes)
    calls.clear()
    P.Pipeline([P.grow_vocab(vocab=1100), P.grow_mlp(hidden=100)])(tiny("llama"))
    assert len(calls) == 8  # the second check's probes draw ids from the larger vocab: nothing to reuse
    calls.clear()

    class Unchecked(P.GrowMLP):  # a pass that does not claim to keep the function
        exact = False

    P.Pipeline([P.grow_mlp(hidden=100), Unchecked(hidden=120), P.add_heads(n=2)])(tiny("llama"))
    assert len(calls) == 8  # nothing is handed across a pass whose behaviour was not checked


def test_probes_are_long_enough_for_a_sliding_window_to_cut_in():
    spec = mptc.spec_of(tiny("llama"))
    windowed = spec.replace(layers=[dataclasses.replace(ly, attention=dataclasses.replace(ly.attention, window=6))
                                    for ly in spec.layers])
    (x,) = V.probes(windowed)
    assert x["input_ids"].shape == (2, 13)

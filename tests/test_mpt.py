"""Multi-parameter transformers: token types, conditional / adaptive / expert embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mptc
from mptc import passes as P

from .conftest import perturbed

ROOT = Path(__file__).resolve().parent.parent
MPT = sorted((ROOT / "examples").glob("mpt-*.mpt"))

BASE = """\
model m {
  vocab = 64
  context = 16
  width = 32
  conditions = 4
  embed { positions = learned }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4 }
    mlp { hidden = 64 }
  }
  head lm { }
}
"""


def variant(old: str, new: str) -> mptc.Spec:
    assert old in BASE
    return mptc.parse(BASE.replace(old, new, 1), "m.mpt")


FEATURES = {
    "types": ("embed { positions = learned }", "embed { positions = learned, types { text = 40, code = 24 } }"),
    "modulate": ("embed { positions = learned }\n  layers 2 {",
                 "embed { types { text = 40, code = 24 } }\n  layers 2 {\n    modulate = true"),
    "condition": ("embed { positions = learned }", "embed { condition = film(hidden = 16) }"),
    "adaptive": ("embed { positions = learned }", "embed { adaptive = film(hidden = 16) }"),
    "experts-token": ("embed { positions = learned }", "embed { experts = moe(count = 3, gate = token) }"),
    "experts-condition": ("embed { positions = learned }",
                          "embed { experts = moe(count = 3, gate = condition, top = 2) }"),
    "hyper": ("layers 2 {",
              "layers 2 {\n    hyper = [lowrank(target = v, rank = 2, hidden = 8), lowrank(target = up)]"),
    "multimodal": ("embed { positions = learned }",
                   "embed { input = [patches(image = 8, patch = 4, channels = 3, cls = true), tokens] }"),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_feature_compiles_and_onnx_matches(feature, tmp_path):
    spec = variant(*FEATURES[feature])
    assert mptc.parse(str(spec)) == spec
    model = perturbed(spec)
    assert mptc.summarize(spec).params == sum(p.numel() for p in model.parameters())
    mptc.export_onnx(model, tmp_path / "m.onnx")
    for batch, seq in ((1, 5), (3, 11)):
        x = mptc.example_inputs(spec, batch=batch, seq=seq, seed=seq, padded=True)
        with torch.no_grad():
            ref = model(**x).numpy()
        np.testing.assert_allclose(mptc.run_onnx(tmp_path / "m.onnx", x), ref, rtol=1e-4, atol=1e-4)


def test_the_feature_changes_the_function():
    """Each feature's parameters reach the output (and the side input does, where it is read)."""
    for feature in ("condition", "experts-condition", "hyper"):
        spec = variant(*FEATURES[feature])
        model = perturbed(spec)
        x = mptc.example_inputs(spec, batch=2, seq=6)
        with torch.no_grad():
            a = model(**x)
            b = model(**{**x, "conditions": x["conditions"] + 1.0})
        assert (a - b).abs().max() > 1e-3, feature
    spec = variant(*FEATURES["modulate"])
    model = perturbed(spec)
    ids = torch.tensor([[3, 45, 7, 50]])
    with torch.no_grad():
        before = model(input_ids=ids)
        model.get_parameter("layers.0.modulate.shift")[1] += 1.0  # only type 1 ("code": ids 40..63)
        after = model(input_ids=ids)
    assert (before[0, 0] - after[0, 0]).abs().max() < 1e-6  # position 0 is text and sees no code token
    assert (before[0, 1] - after[0, 1]).abs().max() > 1e-3


def test_token_types_are_separate_matrices_tied_to_the_head():
    spec = variant("embed { positions = learned }\n  layers", "embed { types { a = 40, b = 24 } }\n  layers")
    spec = spec.replace(head=mptc.parse(BASE.replace("head lm { }", "head lm { tied = true }")).head)
    model = mptc.build(spec)
    assert tuple(model.get_parameter("embed.types.a.weight").shape) == (40, 32)
    assert tuple(model.get_parameter("embed.types.b.weight").shape) == (24, 32)
    x = torch.tensor([[1, 45]])
    h = torch.randn(1, 2, 32)
    table = torch.cat([model.get_parameter("embed.types.a.weight"), model.get_parameter("embed.types.b.weight")])
    assert "head.out.weight" not in dict(model.named_parameters())
    torch.testing.assert_close(torch.nn.functional.embedding(x, table)[0, 1],
                               model.get_parameter("embed.types.b.weight")[5])
    assert h.shape[-1] == table.shape[-1]


def _classify(spec_text_old: str, spec_text_new: str, classes: int = 4) -> mptc.Spec:
    head = f"head classify {{ classes = {classes}, pool = mean }}"
    text = BASE.replace(spec_text_old, spec_text_new, 1).replace("head lm { }", head)
    return mptc.parse(text.replace("attention { heads = 4 }", "attention { heads = 4, mask = bidirectional }"))


def _train(model, batches, steps: int = 80, lr: float = 3e-3) -> tuple[float, float]:
    """(first loss, mean of the last ten)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        x, y = batches(step)
        loss = torch.nn.functional.cross_entropy(model(**x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-10:]) / 10


@pytest.mark.parametrize("feature", ["condition", "experts-condition", "hyper"])
def test_training_reads_the_side_input(feature):
    """The label is a function of `conditions` alone (the tokens are noise): only the feature can learn it."""
    spec = _classify(*FEATURES[feature])
    model = mptc.build(spec, seed=0)
    g = torch.Generator().manual_seed(0)

    def batches(step):
        c = torch.randn(32, 4, generator=g)
        ids = torch.randint(0, 64, (32, 8), generator=g)
        return {"input_ids": ids, "conditions": c}, c.argmax(-1)

    first, last = _train(model, batches, steps=150, lr=1e-2)
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("feature", ["types", "modulate", "adaptive", "experts-token"])
def test_training_tells_token_types_apart(feature):
    """Label: how many ids of the second type (40..63) a sequence holds, capped at 3."""
    spec = _classify(*FEATURES[feature])
    model = mptc.build(spec, seed=0)
    g = torch.Generator().manual_seed(1)

    def batches(step):
        ids = torch.randint(0, 64, (32, 6), generator=g)
        return {"input_ids": ids}, (ids >= 40).sum(-1).clamp(max=3)

    first, last = _train(model, batches, steps=120)
    assert last < 0.6 * first, (first, last)


def test_multimodal_training_needs_both_inputs():
    """Label = (image brighter than average) × 2 + (the text holds more ids ≥ 32 than < 32)."""
    spec = _classify(*FEATURES["multimodal"])
    model = mptc.build(spec, seed=0)
    g = torch.Generator().manual_seed(2)

    def batches(step):
        px = torch.randn(32, 3, 8, 8, generator=g) + torch.randn(32, 1, 1, 1, generator=g)
        ids = torch.randint(0, 64, (32, 5), generator=g)
        y = (px.mean((1, 2, 3)) > 0).long() * 2 + ((ids >= 32).sum(-1) >= 3).long()
        return {"input_ids": ids, "pixel_values": px}, y

    first, last = _train(model, batches, steps=150, lr=3e-3)
    assert last < 0.6 * first, (first, last)


def test_multimodal_mask_covers_the_text_only():
    spec = variant(*FEATURES["multimodal"]).replace(head=mptc.parse(BASE).head)
    model = perturbed(spec)
    px = torch.randn(1, 3, 8, 8)
    ids = torch.tensor([[3, 9, 4]])
    padded = torch.tensor([[3, 9, 4, 60, 61]])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=px)
        b = model(input_ids=padded, pixel_values=px, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    assert a.shape == (1, 5 + 3, 64)  # four patches and a class token, then the text
    torch.testing.assert_close(b[:, :8], a, rtol=1e-5, atol=1e-5)


def test_tasks_select_sub_networks(tmp_path, capsys):
    from mptc.cli import main
    from mptc.nested import granularity

    path = ROOT / "examples" / "mpt-hyper.mpt"
    model = perturbed(mptc.load(path))
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=6)
    with torch.no_grad(), granularity(model, task="edge") as choice:
        edge = model(**x)
    assert choice.skip == {1, 2} and choice.mlp == (0.125,) * 4
    mptc.save(model, tmp_path / "m")
    assert main(["compile", str(tmp_path / "m"), "--task", "all", "-o", str(tmp_path / "m.onnx")]) == 0
    assert sorted(p.name for p in tmp_path.glob("m.*.onnx")) == ["m.chat.onnx", "m.edge.onnx", "m.full.onnx"]
    np.testing.assert_allclose(mptc.run_onnx(tmp_path / "m.edge.onnx", x), edge.numpy(), rtol=1e-4, atol=1e-4)
    assert main(["run", str(tmp_path / "m"), "--random", "1", "--task", "chta"]) == 1
    assert "has no task 'chta'" in capsys.readouterr().err
    with pytest.raises(mptc.SpecError, match="task 'edge': layer 0 is not skippable") as e:
        mptc.parse(path.read_text().replace("skip = [1, 2]", "skip = [0]"))
    assert (e.value.line, e.value.col) == (22, 12)


GROWTH = [P.grow_mlp(factor=2.0), P.add_heads(n=2), P.grow_head_dim(value=24), P.grow_qk(dim=20),
          P.grow_width(width=96), P.add_layers(n=1, at=1), P.add_layers(n=1, init="copy"), P.grow_vocab(vocab=600),
          P.grow_context(context=160), P.add_kv_heads(n=2)]
REFUSED = {
    ("mpt-token-types", "grow_vocab"): "split into token types",
    ("mpt-hyper", "grow_mlp"): "is nested",
    **{(name, "add_kv_heads"): "kv heads" for name in ("mpt-token-types", "mpt-moe-embed", "mpt-hyper",
                                                          "mpt-multimodal")},
}


@pytest.mark.parametrize("path", MPT, ids=[p.stem for p in MPT])
@pytest.mark.parametrize("p", GROWTH, ids=[str(p) for p in GROWTH])
def test_growth_on_mpt_examples(path, p):
    model = perturbed(mptc.load(path))
    refusal = REFUSED.get((path.stem, p.name))
    if refusal:
        with pytest.raises(P.PassError, match=refusal):
            P.Pipeline([p])(model)
        return
    new, report = P.Pipeline([p])(model)
    assert report.passes[0].max_abs_error_float64 <= 1e-9


@pytest.mark.parametrize("old,new,msg,line,col", [
    ("embed { positions = learned }", "embed { types { text = 40, code = 20 } }",
     "the token types cover 60 ids but vocab = 64", 6, 11),
    ("embed { positions = learned }", "embed { types { text = 40, text = 24 } }",
     "token type 'text' is declared twice", 6, 30),
    ("embed { positions = learned }", "embed { types { } }", "types needs at least one", 6, 11),
    ("layers 2 {", "layers 2 {\n    modulate = true", "modulate needs token types", 8, 16),
    ("  conditions = 4\n", "", "condition reads the side input, but the model declares no `conditions", 5, 23),
    ("embed { positions = learned }", "embed { experts = moe(count = 3, top = 4) }", "top = 4 exceeds count = 3",
     6, 21),
    ("embed { positions = learned }", "embed { experts = moe(count = 3, gate = tokens) }", "unknown gate 'tokens'",
     6, 43),
    ("embed { positions = learned }", "embed { adaptive = film(size = 3) }", "unknown argument 'size' for film()",
     6, 34),
    ("embed { positions = learned }", "embed { adaptive = mlp(hidden = 3) }", "adaptive must be film(hidden = …)",
     6, 22),
    ("layers 2 {", "layers 2 {\n    hyper = lowrank(target = qq)", "unknown target 'qq'", 8, 30),
    ("embed { positions = learned }", "embed { input = [tokens, tokens] }", "one patches(…) and tokens", 6, 19),
    ("head lm { }", "head lm { tied = true }\n", "a tied head needs a single token table", 12, 20),
])
def test_bad_mpt_specs(old, new, msg, line, col):
    text = BASE.replace(old, new, 1)
    if "condition reads" in msg:
        text = text.replace("embed { positions = learned }", "embed { condition = film(hidden = 8) }")
    if "unknown target" in msg:
        text = text.replace("lowrank(target = qq)", "lowrank(target = qq, rank = 2)")
    if "single token table" in msg:
        text = text.replace("embed { positions = learned }", "embed { experts = moe(count = 2) }")
    with pytest.raises(mptc.SpecError) as e:
        mptc.parse(text, "m.mpt")
    assert msg in e.value.message
    assert (e.value.line, e.value.col) == (line, col), e.value.render()


def test_training_through_tasks():
    """Each step trains every task's sub-network (summed loss, shared weights); all their losses fall."""
    from mptc.nested import granularity

    text = BASE.replace("mlp { hidden = 64 }", "mlp { hidden = 64, nested = [1/4, 1] }").replace(
        "layers 2 {", "layers 2 {\n    skippable = [false, true]").replace(
        "head lm { }", 'head lm { }\n  tasks { small = subnet(mix = "m", skip = [1]), full = subnet() }')
    spec = mptc.parse(text)
    model = mptc.build(spec, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    first, last = {}, {}
    for _ in range(60):
        ids = torch.randint(0, 16, (16, 12), generator=g) * 4 % 64  # a learnable, skewed next-token law
        opt.zero_grad()
        for task in ("small", "full"):
            with granularity(model, task=task):
                logits = model(input_ids=ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].flatten())
            loss.backward()
            first.setdefault(task, loss.item())
            last[task] = loss.item()
        opt.step()
    for task in ("small", "full"):
        assert last[task] < 0.8 * first[task], (task, first, last)

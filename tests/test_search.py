"""`mptc search`: Mix'n'Match sizes, the heuristic pick, the measured Pareto front, plots, the CLI."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import mptc
from mptc import search as M
from mptc.choice import parse_choice, sub_spec
from mptc.cli import main
from mptc.data import read_bytes, split_tokens
from mptc.errors import MptcError
from mptc.train import TrainConfig, eval_batches, train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [str(STDLIB / n) for n in ("argparse.py", "textwrap.py", "string.py")]
SPEC = """model mix3 {
  vocab = 256
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 3 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 2, bias = false }
    mlp { hidden = 128, activation = gelu, bias = false, nested = [1/8, 1/4, 1/2, 1] }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""
PNG = b"\x89PNG\r\n\x1a\n"



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def trained():
    """A nested model trained briefly on real text, and held-out batches."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tokens = read_bytes(FILES)
    model, _ = train(mptc.build(mptc.parse(SPEC), seed=0), tokens,
                     TrainConfig(steps=30, batch=8, lr=1e-2, warmup=3, eval_every=30, eval_batches=1))
    _, val = split_tokens(tokens)
    torch.set_num_threads(n)
    return model.eval(), eval_batches(val, 2, 8, 32)


def test_parse_budget():
    assert M.parse_budget("params=600000") == M.Budget("params", 600_000)
    assert M.parse_budget("params=1.5M") == M.Budget("params", 1_500_000)
    assert M.parse_budget("flops = 2e6") == M.Budget("flops", 2_000_000)
    assert M.parse_budget("params=600_000") == M.Budget("params", 600_000)
    for bad in ("params=abc", "size=3", "params", "params=0", "params=1..2", ""):
        with pytest.raises(MptcError, match="params=N or flops=N|positive"):
            M.parse_budget(bad)


def test_sizes_are_exact_for_every_configuration():
    spec = mptc.parse(SPEC)
    sizer = M.Sizer(spec)
    cands = M.candidates(spec, "all")
    assert len(cands) == 4**3 and len(M.candidates(spec, "monotone")) == 20  # C(6, 3) non-decreasing
    for mlp in cands[::7]:
        p = sizer.point(mlp)
        s = mptc.summarize(sub_spec(spec, parse_choice(spec, p.mix)))
        assert (p.params, p.flops) == (s.params, s.flops_per_token), p.mix
    assert sizer.point((0.125, 0.25, 0.5)).slow and not sizer.point((0.125, 0.5, 1.0)).slow
    assert sizer.point((0.125, 0.5, 1.0)).monotone and not sizer.point((0.5, 0.25, 1.0)).monotone


def test_heuristic_prefers_slow_changes():
    sizer = M.Sizer(mptc.parse(SPEC))
    points = [sizer.point(m) for m in M.candidates(sizer.spec, "all")]
    jump = sizer.point((0.125, 0.125, 1.0))  # s,s,xl: monotone but not slow
    pick = M.heuristic_pick(points, M.Budget("params", jump.params))
    assert pick.slow and pick.params <= jump.params and pick.mix == "m,l,l"
    assert M.heuristic_pick(points, M.Budget("params", 10)) is None


def test_search_respects_budget_and_front_is_pareto(trained, tmp_path):
    model, batches = trained
    whole = mptc.summarize(model).params
    budget = M.Budget("params", int(whole * 0.85))
    r = M.search(model, budget, batches, family="all")
    assert r.points and all(p.params <= budget.limit for p in r.points)
    assert all(p.loss is not None for p in r.points) and r.best.loss == min(p.loss for p in r.points)
    assert r.heuristic.params <= budget.limit and r.heuristic.slow
    front = r.front
    assert front[-1] is r.best or front[-1].loss == r.best.loss
    for a, b in zip(front, front[1:], strict=False):
        assert a.params < b.params and a.loss > b.loss
    for f in front:  # no evaluated point dominates a front point
        assert not any(p.params <= f.params and p.loss <= f.loss and (p.params, p.loss) != (f.params, f.loss)
                       for p in r.points)
    assert set(r.uniform) == {"s", "m", "l", "xl"} and r.uniform["xl"].params == whole
    out = M.plot(r, tmp_path / "front.png")
    assert out.read_bytes()[:8] == PNG
    data = json.loads(M.write_json(r, tmp_path / "r.json").read_text())
    assert data["budget"] == {"metric": "params", "limit": budget.limit} and len(data["front"]) == len(front)


def test_search_flops_budget_and_too_small(trained):
    model, _ = trained
    r = M.search(model, M.Budget("flops", 10**12))  # no data: heuristic only
    assert r.best is None and r.heuristic.mix == "xl,xl,xl" and r.front == []
    with pytest.raises(MptcError, match=r"no sub-network fits params ≤ 1.00K: the smallest \(s,s,s\)"):
        M.search(model, M.Budget("params", 1000))


def test_search_refuses_models_without_nesting():
    with pytest.raises(MptcError, match="has no nested MLPs"):
        M.search(mptc.build(mptc.parse(SPEC.replace(", nested = [1/8, 1/4, 1/2, 1]", "")), device="meta"),
                 M.Budget("params", 10**9))


def test_cli_search_writes_table_plot_and_json(trained, tmp_path, capsys):
    model, _ = trained
    mptc.save(model, tmp_path / "m")
    png, js = tmp_path / "f.png", tmp_path / "f.json"
    assert main(["search", str(tmp_path / "m"), "--data", *FILES, "--budget", "params=60K", "--eval-batches", "1",
                 "--batch", "4", "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "heuristic pick" in out and "best measured" in out
    assert png.read_bytes()[:8] == PNG and json.loads(js.read_text())["budget"]["limit"] == 60_000


def test_cli_search_errors(tmp_path, capsys):
    spec = tmp_path / "m.mpt"
    spec.write_text(SPEC)
    assert main(["search", str(spec), "--budget", "params=abc"]) == 1
    assert "error: a budget is params=N or flops=N" in capsys.readouterr().err
    assert main(["search", str(spec), "--budget", "params=1M", "--data", str(tmp_path / "nope.txt")]) == 1
    assert f"no such data file: {tmp_path / 'nope.txt'}" in capsys.readouterr().err
    assert main(["search", str(spec), "--budget", "params=1M", "--plot", str(tmp_path / "x.png")]) == 1
    assert "--plot needs held-out losses" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_search_of_a_plain_model_gives_per_layer_widths_that_extract_and_compile(tmp_path, capsys):
    """A model without nesting: the greedy search over MLP units, kv groups and layers, then the
    printed `mptc extract` command, whose result fits the budget and compiles to ONNX."""
    plain = SPEC.replace(", nested = [1/8, 1/4, 1/2, 1]", "").replace("heads = 2,", "heads = 2, kv_heads = 2,")
    mptc.save(mptc.build(mptc.parse(plain), seed=0), tmp_path / "m")
    full = mptc.summarize(mptc.parse(plain)).params
    js = tmp_path / "w.json"
    assert main(["search", str(tmp_path / "m"), "--data", *FILES, "--budget", f"params={full - 20_000}",
                 "--what", "mlp,heads,layers", "--eval-batches", "1", "--batch", "4", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "per-layer widths under params" in out and "extract it: mptc extract" in out
    r = json.loads(js.read_text())
    assert r["params"] <= full - 20_000 and len(r["mix"].split(",")) == 3
    args = ["--mix", r["mix"], "--heads", r["heads"]] + (["--drop-layers", ",".join(map(str, r["skip"]))]
                                                         if r["skip"] else [])
    assert main(["extract", str(tmp_path / "m"), *args, "-o", str(tmp_path / "sub")]) == 0, capsys.readouterr()
    sub = mptc.load_model(tmp_path / "sub")
    assert sum(p.numel() for p in sub.parameters()) == r["params"]
    assert main(["compile", str(tmp_path / "sub"), "-o", str(tmp_path / "sub.onnx")]) == 0
    assert main(["search", str(tmp_path / "m"), "--budget", "params=10K"]) == 1
    assert "a model without nesting is searched on measured losses" in capsys.readouterr().err


def test_cli_search_with_correct_lsq_chooses_widths_for_the_refit_model(tmp_path, capsys, monkeypatch):
    """`--correct lsq` runs the per-layer search with each cut refit by ridge least squares (the ridge `mptc
    extract --correct lsq` uses); a nested model refuses it by name."""
    from mptc.passes.correct import DEFAULT_RIDGE

    plain = SPEC.replace(", nested = [1/8, 1/4, 1/2, 1]", "")
    mptc.save(mptc.build(mptc.parse(plain), seed=0), tmp_path / "m")
    full = mptc.summarize(mptc.parse(plain)).params
    seen, real = [], M.plain_search

    def spy(*a, **k):
        seen.append(k.get("refit_ridge"))
        return real(*a, **k)

    monkeypatch.setattr(M, "plain_search", spy)
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps the console's lines at its width
    common = ["search", str(tmp_path / "m"), "--data", *FILES, "--budget", f"params={full - 20_000}",
              "--eval-batches", "1", "--batch", "4"]
    losses = {}
    for correct in ("none", "lsq"):
        js = tmp_path / f"{correct}.json"
        assert main([*common, "--correct", correct, "--json", str(js)]) == 0
        out = capsys.readouterr().out
        assert ("refit by least squares" in out) == (correct == "lsq")
        r = json.loads(js.read_text())
        assert r["correct"] == correct and r["params"] <= full - 20_000
        losses[correct] = r["loss"]
    assert seen == [None, DEFAULT_RIDGE]
    assert losses["lsq"] < losses["none"]  # the refit recovers part of what the same budget's cuts cost
    mptc.save(mptc.build(mptc.parse(SPEC), seed=0), tmp_path / "nested")
    assert main(["search", str(tmp_path / "nested"), "--budget", "params=100K", "--correct", "lsq"]) == 1
    assert "--correct lsq applies to the per-layer search of a model without nesting" in capsys.readouterr().err

"""`mptc train`: the trainer, MatFormer training, checkpoints and exact resume, the CLI."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import mptc
from mptc.cli import main
from mptc.data import read_bytes, resolve_sources, split_tokens
from mptc.train import TrainConfig, Trainer, granularities, lr_factor, train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [str(STDLIB / n) for n in ("argparse.py", "dataclasses.py", "textwrap.py", "functools.py", "string.py")]

TINY = """model tiny_lm {
  vocab = 256
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 2, bias = false }
    mlp { hidden = 64, activation = gelu, bias = false%s }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""
NESTED = TINY % ", nested = [1/8, 1/4, 1/2, 1]"
PLAIN = TINY % ""
FAST = dict(batch=8, seq=32, lr=1e-2, warmup=5, eval_batches=2)



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return read_bytes(FILES)  # ~230K bytes of real Python source


def _model(text: str, seed: int = 0):
    return mptc.build(mptc.parse(text), seed=seed)


def test_loss_falls_on_stdlib_text(tokens):
    model, log = train(_model(PLAIN), tokens, TrainConfig(steps=60, eval_every=60, **FAST))
    first, last = log["eval"][0]["losses"]["full"], log["eval"][-1]["losses"]["full"]
    assert first > 5.0 and last < first - 2.0  # from ~ln 256 to well under uniform
    assert [e["step"] for e in log["eval"]] == [0, 60] and len(log["train"]) == 60
    assert log["train"][0]["lr"] == pytest.approx(1e-2 / 5)  # warmup starts small


def test_schedule_warmup_then_cosine():
    c = TrainConfig(steps=100, warmup=10, min_lr=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(55, c) == pytest.approx(0.55)
    assert lr_factor(100, c) == pytest.approx(0.1) and lr_factor(500, c) == pytest.approx(0.1)


def test_granularities_align_levels_at_the_top():
    g = granularities(mptc.parse(NESTED))
    assert list(g) == ["s", "m", "l", "xl"] and g["s"].mlp == (0.125, 0.125) and g["xl"].is_full
    assert list(granularities(mptc.parse(PLAIN))) == ["full"]
    # MLP in four levels, heads in two (layer 1 only): the heads go whole only at xl
    g = granularities(mptc.parse(NESTED.replace("bias = false }", "bias = false, nested = [none, [1/2, 1]] }", 1)))
    assert g["s"].heads == g["l"].heads == (1.0, 0.5) and g["xl"].heads == (1.0, 1.0)


def test_nested_sum_trains_every_granularity(tokens):
    _, log = train(_model(NESTED), tokens, TrainConfig(steps=40, eval_every=40, **FAST))
    first, last = log["eval"][0]["losses"], log["eval"][-1]["losses"]
    assert list(last) == ["s", "m", "l", "xl"]
    assert all(set(e["losses"]) == {"s", "m", "l", "xl"} for e in log["train"])  # every step, every granularity
    for name in last:
        assert last[name] < first[name] - 1.5, name
    step = log["train"][-1]
    assert step["loss"] == pytest.approx(sum(step["losses"].values()))  # the MatFormer objective: the sum


def test_nested_sample_draws_one_granularity_per_step(tokens):
    _, log = train(_model(NESTED), tokens, TrainConfig(steps=40, eval_every=40, nested="sample", **FAST))
    drawn = [next(iter(e["losses"])) for e in log["train"]]
    assert all(len(e["losses"]) == 1 for e in log["train"]) and len(set(drawn)) == 4
    first, last = log["eval"][0]["losses"], log["eval"][-1]["losses"]
    assert all(last[n] < first[n] - 1.0 for n in last)


@pytest.mark.parametrize("nested", ["sum", "sample"])
def test_resume_equals_uninterrupted(tokens, tmp_path, nested):
    config = dict(steps=12, eval_every=4, nested=nested, **FAST)
    _, whole = train(_model(NESTED), tokens, TrainConfig(**config))
    half = tmp_path / "ck"
    train(_model(NESTED), tokens, TrainConfig(stop_at=6, **config), out=half)
    assert json.loads((half / "log.json").read_text())["train"][-1]["step"] == 6
    t = Trainer.resume(half, tokens, stop_at=None)
    assert t.step == 6
    resumed = t.run(out=half)
    a = [(e["step"], e["losses"]) for e in whole["train"]]
    b = [(e["step"], e["losses"]) for e in resumed["train"]]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) <= 1e-6 for k in la)
    evals = {e["step"]: e["losses"] for e in resumed["eval"]}  # also has step 6, where the first part stopped
    assert [e["step"] for e in whole["eval"]] == [0, 4, 8, 12] and set(evals) == {0, 4, 6, 8, 12}
    for e in whole["eval"]:
        assert e["losses"] == pytest.approx(evals[e["step"]], abs=1e-6)
    assert whole["train"][-1]["losses"] == resumed["train"][-1]["losses"]  # in fact bit for bit


def test_checkpoint_is_a_model_dir(tokens, tmp_path):
    out = tmp_path / "run"
    model, log = train(_model(PLAIN), tokens, TrainConfig(steps=3, eval_every=3, **FAST), out=out)
    assert {p.name for p in out.iterdir()} == {"model.mpt", "weights.safetensors", "trainer.pt", "log.json"}
    again = mptc.load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    state = torch.load(out / "trainer.pt", weights_only=True)
    assert state["step"] == 3 and {"optimizer", "generator", "torch_rng", "config", "log"} <= state.keys()


def test_data_sources_and_split(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("bb")
    (d / "a.txt").write_text("a")
    assert [p.name for p in resolve_sources([str(d)])] == ["a.txt", "b.txt"]
    train_part, held = split_tokens(torch.arange(100), 0.05)
    assert train_part.numel() == 95 and held.tolist() == list(range(95, 100))


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def spec_file(tmp_path) -> str:
    p = tmp_path / "nested.mpt"
    p.write_text(NESTED)
    return str(p)


def test_cli_train_then_resume_matches_one_run(spec_file, tmp_path, capsys):
    common = ["--data", *FILES[:2], "--steps", "6", "--batch", "4", "--seq", "16", "--eval-every", "3",
              "--eval-batches", "1", "--warmup", "2", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", spec_file, *common, "-o", str(one)]) == 0
    out = capsys.readouterr().out
    assert "granularities s, m, l, xl (sum)" in out and f"wrote {one}" in out
    assert main(["train", spec_file, *common, "--stop-at", "3", "-o", str(two)]) == 0
    assert main(["train", "--resume", str(two), "--no-progress", "-o", str(two)]) == 0  # data and options restored
    assert "resuming tiny_lm at step 3" in capsys.readouterr().out
    la, lb = (json.loads((d / "log.json").read_text()) for d in (one, two))
    assert len(la["train"]) == len(lb["train"]) == 6
    for ea, eb in zip(la["train"], lb["train"], strict=True):
        assert ea["losses"] == pytest.approx(eb["losses"], abs=1e-6)
    assert lb["data"] == FILES[:2] and la["eval"][-1]["step"] == lb["eval"][-1]["step"] == 6


def test_cli_errors(spec_file, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["train", spec_file, "-o", out]) == 1
    err = capsys.readouterr().err
    assert "error: no training data given" in err and "--data stdlib" in err
    assert main(["train", spec_file, "--data", str(tmp_path / "missing.txt"), "-o", out]) == 1
    assert f"error: no such data file: {tmp_path / 'missing.txt'}" in capsys.readouterr().err
    assert main(["train", "examples/matvit.mpt", "--data", FILES[0], "-o", out]) == 1
    assert "is not a language model" in capsys.readouterr().err
    assert main(["train", spec_file, "--data", FILES[0], "--seq", "64", "-o", out]) == 1
    assert "--seq 64 exceeds the model's context of 32" in capsys.readouterr().err
    assert main(["train", spec_file, "--data", FILES[0], "--steps", "0", "-o", out]) == 1
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "-o", out]) == 1
    assert "is not a training checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # usage errors exit 1 from argparse
        main(["train", spec_file, "--data", FILES[0], "--nested", "both", "-o", out])
    assert e.value.code == 1 and "invalid choice: 'both'" in capsys.readouterr().err
    assert not Path(out).exists()

"""`mptc train --grow`: growth schedules during training, resume across growth; `--tokenizer`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mptc
from mptc.cli import main
from mptc.data import load_tokenizer, read_bytes, read_tokens
from mptc.errors import MptcError
from mptc.train import TrainConfig, Trainer, evaluate, lr_factor, train

from .test_train import FAST, FILES, NESTED, PLAIN

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = ["10: grow_width(width = 48); grow_mlp(factor = 2)", "20: add_layers(n = 1, at = 2)"]
DROPOUT = PLAIN.replace("rope(theta = 10000.0) }", "rope(theta = 10000.0), dropout = 0.1 }")  # the torch RNG in use


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return read_bytes(FILES)


def _model(text: str = PLAIN):
    return mptc.build(mptc.parse(text), seed=0)


def test_growth_mid_run_keeps_the_function_and_trains_on(tokens):
    config = TrainConfig(steps=30, eval_every=10, growth=SCHEDULE, regrow_warmup=3, **FAST)
    t = Trainer(_model(), tokens, config)
    log = t.run()
    grown = log["growth"]
    assert [g["step"] for g in grown] == [10, 20]
    assert [p.split("(")[0] for p in grown[0]["passes"]] == ["grow_width", "grow_mlp"]
    assert grown[1]["passes"] == ["add_layers(n = 1, at = 2, init = normal)"]
    for g in grown:
        assert abs(g["loss_before"] - g["loss_after"]) <= 1e-5, g
        assert g["params_after"] > g["params_before"]
    assert grown[0]["params_after"] == grown[1]["params_before"]
    assert t.spec.width == 48 and t.spec.n_layers == 3 and t.spec.layers[0].mlp.hidden == 128
    assert grown[1]["params_after"] == sum(p.numel() for p in t.model.parameters())
    # training goes on and lowers the loss after each growth: held-out loss, and the fixed batch
    evals = {e["step"]: e["losses"]["full"] for e in log["eval"]}
    assert evals[20] < evals[10] - 0.05 and evals[30] < evals[20] - 0.05
    assert evaluate(t.model, t.eval_x[:1]) < grown[1]["loss_after"] - 0.05
    # the step count and schedule position are kept; the LR re-warms over 3 steps after each growth
    lr = {e["step"] - 1: e["lr"] for e in log["train"]}  # 0-based step index → its learning rate
    for s, ramp in ((9, 1.0), (10, 1 / 3), (11, 2 / 3), (12, 1.0), (20, 1 / 3), (23, 1.0)):
        assert lr[s] == pytest.approx(1e-2 * lr_factor(s, config) * ramp), s
    # AdamW: decay on matrices only, every parameter of the grown model, state carried (step counts)
    decay, rest = t.opt.param_groups
    assert decay["weight_decay"] == config.weight_decay and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in rest["params"])
    assert {id(p) for p in decay["params"] + rest["params"]} == {id(p) for p in t.model.parameters()}
    assert {float(t.opt.state[p]["step"]) for p in t.model.parameters()} == {30.0}


def test_resume_across_growth_equals_uninterrupted(tokens, tmp_path):
    config = dict(steps=12, eval_every=4, growth=["4: grow_mlp(factor = 2)",
                                                  "8: grow_width(width = 48); add_layers(n = 1, at = 1)"], **FAST)
    assert DROPOUT != PLAIN
    _, whole = train(_model(DROPOUT), tokens, TrainConfig(**config))
    ck = tmp_path / "ck"
    train(_model(DROPOUT), tokens, TrainConfig(stop_at=4, **config), out=ck)  # stops at the growth step, not grown
    assert json.loads((ck / "log.json").read_text())["growth"] == []
    assert mptc.load(ck / "model.mpt").layers[0].mlp.hidden == 64
    Trainer.resume(ck, tokens, stop_at=6).run(out=ck)  # grows at 4, checkpoints the grown model at 6
    assert [g["step"] for g in json.loads((ck / "log.json").read_text())["growth"]] == [4]
    assert mptc.load(ck / "model.mpt").layers[0].mlp.hidden == 128  # the checkpoint holds the grown spec
    t = Trainer.resume(ck, tokens)
    assert t.step == 6 and [e.step for e in t.pending] == [8]  # step 4's growth is not run again
    resumed = t.run(out=ck)
    assert [g["step"] for g in resumed["growth"]] == [4, 8] and mptc.load(ck / "model.mpt").width == 48
    assert all(abs(g["loss_before"] - g["loss_after"]) <= 1e-5 for g in whole["growth"])  # eval mode: no dropout
    a = [(e["step"], e["losses"]) for e in whole["train"]]
    b = [(e["step"], e["losses"]) for e in resumed["train"]]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert abs(la["full"] - lb["full"]) <= 1e-6
    assert whole["train"][-1]["losses"] == resumed["train"][-1]["losses"]  # in fact bit for bit
    for ga, gb in zip(whole["growth"], resumed["growth"], strict=True):
        assert ga["params_after"] == gb["params_after"] and ga["loss_after"] == pytest.approx(gb["loss_after"],
                                                                                              abs=1e-6)


def test_schedule_checked_before_training(tokens, tmp_path):
    def refused(growth: list[str], text: str = PLAIN, **kw) -> str:
        with pytest.raises(MptcError) as e:
            Trainer(_model(text), tokens, TrainConfig(**{**dict(steps=10, growth=growth, **FAST), **kw}))
        return e.value.render()

    assert "--grow 1: step 10 is not before the last step (--steps 10)" in refused(["10: grow_mlp(factor = 2)"])
    # the second entry is checked against the model the first one makes
    assert "--grow 2 (step 4): grow_mlp cannot shrink the MLP hidden size of layer 0 from 128 to 96" in refused(
        ["2: grow_mlp(hidden = 128)", "4: grow_mlp(hidden = 96)"])
    assert "--grow 1 (step 2): grow_mlp: layer 0's mlp is nested (MatFormer)" in refused(
        ["2: grow_mlp(factor = 2)"], NESTED)
    assert "unknown pass 'extract'" in refused(["2: extract(mlp = s)"], NESTED)  # growth passes only
    assert 'expected "STEP: PASS(…); PASS(…)"' in refused(["grow_mlp(factor = 2)"])
    ck = tmp_path / "ck"
    train(_model(), tokens, TrainConfig(steps=10, stop_at=6, **FAST), out=ck)
    with pytest.raises(MptcError, match="--grow 1: step 3 is already past: the checkpoint is at step 6"):
        Trainer.resume(ck, tokens, growth=["3: grow_mlp(factor = 2)"])


@pytest.fixture
def specs(tmp_path) -> tuple[str, str]:
    plain, nested = tmp_path / "plain.mpt", tmp_path / "nested.mpt"
    plain.write_text(PLAIN)
    nested.write_text(NESTED)
    return str(plain), str(nested)


COMMON = ["--data", *FILES[:2], "--steps", "6", "--batch", "4", "--seq", "16", "--eval-every", "3",
          "--eval-batches", "1", "--warmup", "2", "--no-progress"]


def test_cli_grow_errors_exit_1_before_training(specs, tmp_path, capsys):
    plain, nested = specs
    out = tmp_path / "o"
    assert main(["train", plain, *COMMON, "--grow", "2: grow_mlp(factor = 2)", "--grow", "3: grow_mlp(hiden = 2)",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--grow 2:1:21: error: unknown argument 'hiden' for grow_mlp()" in err  # at its value, as `-p` says
    assert "  3: grow_mlp(hiden = 2)\n" + " " * 22 + "^\n" in err and "did you mean 'hidden'?" in err
    assert main(["train", plain, *COMMON, "--grow", "2: grow_width(width = 48); grow_mlp(factor = 2,)); x",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err  # located in the text as written, `;` and all
    assert "--grow 1:1:49: error: unexpected ')'" in err and "\n" + " " * 50 + "^\n" in err
    assert main(["train", plain, *COMMON, "--grow", "60: grow_mlp(factor = 2)", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: --grow 1: step 60 is not before the last step (--steps 6)" in err and "or raise --steps" in err
    assert main(["train", nested, *COMMON, "--grow", "2: grow_width(width = 48); grow_mlp(factor = 2)",
                 "-o", str(out)]) == 1
    cap = capsys.readouterr()
    assert "error: --grow 1 (step 2): grow_mlp: layer 0's mlp is nested (MatFormer)" in cap.err
    assert "held-out loss" not in cap.out and "data:" not in cap.out  # refused before the data is read
    assert not out.exists()


def _tokenizer(tmp_path: Path, vocab: int = 300) -> Path:
    """A byte-level BPE tokenizer trained here on a little Python source (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path(FILES[2]).read_text()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_read_tokens_with_a_tokenizer(tmp_path):
    path = _tokenizer(tmp_path)
    tok = load_tokenizer(path)
    ids = read_tokens(FILES[:2], tok)
    want = [i for f in FILES[:2] for i in tok.encode(Path(f).read_text() + "\n", add_special_tokens=False).ids]
    assert ids.dtype == torch.long and ids.tolist() == want
    assert ids.numel() < 0.9 * read_bytes(FILES[:2]).numel()  # merges make fewer tokens than bytes
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(MptcError, match=r"latin1.txt is not UTF-8 text \(byte 3\)"):
        read_tokens([bad], tok)
    with pytest.raises(MptcError, match="argparse.py is not a Hugging Face tokenizer.json: "):
        load_tokenizer(FILES[0])


def test_cli_tokenizer_grow_and_resume(specs, tmp_path, capsys):
    path = _tokenizer(tmp_path)
    n = load_tokenizer(path).get_vocab_size(with_added_tokens=True)
    plain, _ = specs
    assert main(["train", plain, *COMMON, "--tokenizer", str(path), "-o", str(tmp_path / "x")]) == 1
    assert f"error: the tokenizer {path} has {n} tokens, more than model 'tiny_lm''s vocab of 256" in \
        capsys.readouterr().err
    big = tmp_path / "big.mpt"
    big.write_text(PLAIN.replace("vocab = 256", "vocab = 320"))
    grow = ["--tokenizer", str(path), "--grow", "3: grow_mlp(factor = 2)", "--regrow-warmup", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(big), *COMMON, *grow, "-o", str(one)]) == 0
    out = capsys.readouterr().out.replace("\n", "")  # the console wraps long lines
    assert f"tokens ({path})" in out and "grew: grow_mlp(factor = 2.0, init = normal)" in out
    assert (one / "tokenizer.json").read_bytes() == path.read_bytes()
    la = json.loads((one / "log.json").read_text())
    assert la["tokenizer"]["vocab"] == n and la["config"]["growth"] == ["3: grow_mlp(factor = 2)"]
    (g,) = la["growth"]
    assert g["step"] == 3 and abs(g["loss_before"] - g["loss_after"]) <= 1e-5 and g["params_after"] > g["params_before"]
    assert mptc.load_model(one).meta["mptc.spec"].layers[0].mlp.hidden == 128  # still a model dir
    # resume takes the tokenizer, the schedule and the options from the checkpoint
    assert main(["train", str(big), *COMMON, *grow, "--stop-at", "2", "-o", str(two)]) == 0
    assert main(["train", "--resume", str(two), "--tokenizer", FILES[0], "--no-progress", "-o", str(two)]) == 1
    assert "is not the tokenizer" in capsys.readouterr().err
    assert main(["train", "--resume", str(two), "--no-progress", "-o", str(two)]) == 0
    lb = json.loads((two / "log.json").read_text())
    assert [e["loss"] for e in lb["train"]] == pytest.approx([e["loss"] for e in la["train"]], abs=1e-6)
    assert [e["lr"] for e in lb["train"]] == pytest.approx([e["lr"] for e in la["train"]])
    assert len(lb["growth"]) == 1 and (two / "tokenizer.json").read_bytes() == path.read_bytes()

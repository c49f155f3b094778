"""Every input a user can give gets an answer: side inputs, segments, `.pt2`, partial nesting, bad files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mptc
from mptc.cli import main
from mptc.nested import granularity

from .conftest import perturbed

ROOT = Path(__file__).resolve().parent.parent
GPT2 = str(ROOT / "tests" / "specs" / "tiny-gpt2.mpt")
VIT = str(ROOT / "tests" / "specs" / "tiny-vit.mpt")

# the shipped multi-modal example at test size, with grouped-query attention
MULTIMODAL = """\
model tiny_multimodal {
  vocab = 64
  context = 24
  width = 32
  embed {
    input = [patches(image = 16, patch = 8, channels = 3, cls = false), tokens]
    positions = learned
  }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, bias = false }
    mlp { hidden = 64, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true }
}
"""

# a side input read by a hypernetwork and by FiLM
HYPER = """\
model tiny_hyper {
  vocab = 64
  context = 16
  width = 32
  conditions = 4
  embed { positions = rope(theta = 10000.0), condition = film(hidden = 8) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    hyper = [lowrank(target = q, rank = 2, hidden = 8), none]
    attention { heads = 4, bias = false }
    mlp { hidden = 64, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""

# layer 1 is not nested
PARTIAL = """\
model partial {
  vocab = 100
  context = 16
  width = 16
  embed { positions = rope(theta = 10000.0) }
  layers 3 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, head_dim = 4, bias = false, nested = [[1/2, 1], none, [1/2, 1]] }
    mlp { hidden = 32, activation = swiglu, bias = false, nested = [[1/4, 1/2, 1], none, [1/4, 1/2, 1]] }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""


def _bert_with_segments() -> str:
    """tests/specs/tiny-bert.mpt with BERT's two segments (token_type_ids)."""
    text = (ROOT / "tests" / "specs" / "tiny-bert.mpt").read_text()
    old = "embed { positions = learned,"
    assert old in text
    return text.replace(old, "embed { segments = 2, positions = learned,")


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / f"{name}.mpt"
    p.write_text(text)
    return str(p)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- .pt2 of a multi-modal model with grouped-query attention --------------------------


def test_pt2_multimodal_gqa_matches_pytorch(tmp_path):
    spec = mptc.parse(MULTIMODAL)
    assert mptc.summarize(spec).params <= 2_000_000
    model = perturbed(spec)
    mptc.export_pt2(model, tmp_path / "m.pt2")
    prog = torch.export.load(str(tmp_path / "m.pt2")).module()
    for batch, seq in ((1, 3), (3, 11), (2, 24)):
        x = mptc.example_inputs(spec, batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            torch.testing.assert_close(prog(**x), model(**x), rtol=1e-5, atol=1e-5)


def test_pt2_multimodal_gqa_from_the_command_line(tmp_path, capsys):
    spec = _write(tmp_path, "mm", MULTIMODAL)
    assert main(["compile", spec, "-o", str(tmp_path / "mm.pt2")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "mm.pt2").is_file()


def test_pt2_exporter_failure_is_a_user_error(tmp_path, monkeypatch):
    model = mptc.build(mptc.parse(MULTIMODAL)).eval()

    def fail(*args, **kwargs):
        raise RuntimeError("the exporter gave up")

    monkeypatch.setattr(torch.export, "export", fail)
    with pytest.raises(mptc.MptcError, match=r"cannot export 'tiny_multimodal' as \.pt2: the exporter gave up") as e:
        mptc.export_pt2(model, tmp_path / "m.pt2")
    assert "ONNX" in e.value.hint
    assert not (tmp_path / "m.pt2").exists()


# --- required inputs: the module and `mptc run` ------------------------------------------


@pytest.mark.parametrize("text, missing", [(HYPER, "conditions"), (MULTIMODAL, "pixel_values")])
def test_module_without_a_required_input_names_it(text, missing):
    spec = mptc.parse(text)
    model = mptc.build(spec).eval()
    x = mptc.example_inputs(spec, batch=2, seq=5)
    del x[missing]
    with pytest.raises(mptc.MptcError, match=f"needs the input '{missing}'"):
        model(**x)


def test_run_without_conditions_names_the_flag(tmp_path, capsys):
    spec = _write(tmp_path, "hyper", HYPER)
    assert main(["run", spec, "--ids", "1 2 3"]) == 1
    err = _err(capsys)
    assert "model 'tiny_hyper' reads the side input 'conditions' (B, 4)" in err
    assert "--conditions-file X.npy" in err


def test_run_with_conditions_file_matches_the_module(tmp_path, capsys):
    spec = mptc.parse(HYPER)
    model = perturbed(spec)
    mptc.save(model, tmp_path / "m")
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    cond = np.random.default_rng(0).standard_normal((2, 4))  # float64: converted
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "c.npy", cond)
    out = tmp_path / "out.npy"
    assert main(["run", str(tmp_path / "m"), "--ids-file", str(tmp_path / "ids.npy"),
                 "--conditions-file", str(tmp_path / "c.npy"), "-o", str(out)]) == 0
    assert "logits (2, 4, 64)" in capsys.readouterr().out
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), conditions=torch.from_numpy(cond).float()).numpy()
        other = model(input_ids=torch.from_numpy(ids), conditions=torch.zeros(2, 4)).numpy()
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ref - other).max() > 1e-3  # the side input reaches the output


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 3)), "conditions must have shape (B, 4), got (2, 3)"),
    (np.zeros((3, 4)), "3 conditions rows but 1 token rows"),
    (np.array([["a", "b", "c", "d"]]), "conditions must be numbers, got <U1"),
    (np.array([[0.0, np.nan, 0.0, 0.0]]), "conditions hold NaN or infinite values (row 0)"),
])
def test_run_rejects_bad_conditions(tmp_path, capsys, array, message):
    spec = _write(tmp_path, "hyper", HYPER)
    np.save(tmp_path / "c.npy", array)
    assert main(["run", spec, "--ids", "1 2 3", "--conditions-file", str(tmp_path / "c.npy")]) == 1
    err = _err(capsys)
    assert str(tmp_path / "c.npy") in err and message in err


def test_run_refuses_inputs_the_model_does_not_read(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.zeros((1, 4)))
    np.save(tmp_path / "t.npy", np.zeros((1, 3), dtype=np.int64))
    assert main(["run", GPT2, "--ids", "1 2 3", "--conditions-file", str(tmp_path / "c.npy")]) == 1
    assert "model 'tiny_gpt2' reads no side input 'conditions'" in _err(capsys)
    assert main(["run", GPT2, "--ids", "1 2 3", "--token-types-file", str(tmp_path / "t.npy")]) == 1
    assert "model 'tiny_gpt2' reads no token_type_ids" in _err(capsys)


# --- segments: token_type_ids optional in PyTorch, ONNX and the CLI ----------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BERT-like model with segments as a model dir and an ONNX file (compiled by the CLI)."""
    tmp = tmp_path_factory.mktemp("bert")
    spec = _write(tmp, "bert", _bert_with_segments())
    assert main(["compile", spec, "-o", str(tmp / "m"), "--seed", "1"]) == 0
    assert main(["compile", str(tmp / "m"), "-o", str(tmp / "m.onnx")]) == 0
    return tmp, mptc.load_model(tmp / "m").eval()


def test_onnx_without_token_type_ids_means_zeros(bert):
    tmp, model = bert
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=6, seed=3)
    assert "token_type_ids" in x
    del x["token_type_ids"]
    with torch.no_grad():
        ref = model(**x).numpy()
        zeros = model(**x, token_type_ids=torch.zeros(2, 6, dtype=torch.int64)).numpy()
    np.testing.assert_allclose(ref, zeros, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mptc.run_onnx(tmp / "m.onnx", x), ref, rtol=1e-4, atol=1e-4)


def test_run_compare_on_a_model_with_segments(bert, capsys):
    tmp, model = bert
    capsys.readouterr()
    out = tmp / "onnx.npy"
    assert main(["run", str(tmp / "m"), "--ids", "5 6 7 8", "--onnx", str(tmp / "m.onnx"), "--compare",
                 "-o", str(out)]) == 0
    assert "agree" in capsys.readouterr().out
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([[5, 6, 7, 8]])).numpy()
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-4, atol=1e-4)


def test_run_token_types_file(bert, capsys):
    tmp, model = bert
    types = np.array([[0, 0, 1, 1]])
    np.save(tmp / "types.npy", types)
    out = tmp / "typed.npy"
    assert main(["run", str(tmp / "m"), "--ids", "5 6 7 8", "--token-types-file", str(tmp / "types.npy"),
                 "--onnx", str(tmp / "m.onnx"), "--compare", "-o", str(out)]) == 0
    assert "agree" in capsys.readouterr().out
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([[5, 6, 7, 8]]), token_type_ids=torch.from_numpy(types)).numpy()
        untyped = model(input_ids=torch.tensor([[5, 6, 7, 8]])).numpy()
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref - untyped).max() > 1e-4  # the segments reach the output


@pytest.mark.parametrize("types, message", [
    (np.array([[0, 1, 2, 0]]), "token type 2 at position 2 (row 0) is outside 0..1"),
    (np.array([[0, 1, 1]]), "token_type_ids have shape (1, 3), the ids (1, 4)"),
    (np.array([[0.0, 1.0, 1.0, 0.0]]), "token types must be integers, got float64"),
])
def test_run_rejects_bad_token_types(bert, capsys, types, message):
    tmp, _ = bert
    np.save(tmp / "bad.npy", types)
    assert main(["run", str(tmp / "m"), "--ids", "5 6 7 8", "--token-types-file", str(tmp / "bad.npy")]) == 1
    assert message in _err(capsys)


# --- one granularity on a partially nested model ------------------------------------------


def test_one_granularity_skips_unnested_layers(tmp_path, capsys):
    spec = mptc.parse(PARTIAL)
    model = perturbed(spec)
    mptc.save(model, tmp_path / "m")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), granularity(model, mlp="m", heads="l") as choice:
        ref = model(input_ids=ids).numpy()
    assert choice.mlp == (0.25, 1.0, 0.25) and choice.heads == (0.5, 1.0, 0.5)
    out = tmp_path / "run.npy"
    assert main(["run", str(tmp_path / "m"), "--ids", "1 2 3 4 5", "--mlp", "m", "--heads", "l", "-o", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-5, atol=1e-5)

    assert main(["extract", str(tmp_path / "m"), "--mlp", "m", "--heads", "l", "-o", str(tmp_path / "sub")]) == 0
    sub = mptc.load_model(tmp_path / "sub").eval()
    s = mptc.spec_of(sub)
    assert [ly.mlp.hidden for ly in s.layers] == [8, 32, 8]
    assert [ly.attention.heads for ly in s.layers] == [2, 4, 2]
    with torch.no_grad():
        np.testing.assert_allclose(sub(input_ids=ids).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_a_mix_naming_an_unnested_layer_is_refused(capsys):
    with pytest.raises(mptc.MptcError, match="layer 1 has no nested MLP"):
        mptc.nested.parse_choice(mptc.parse(PARTIAL), "m,m,m")
    assert mptc.nested.parse_choice(mptc.parse(PARTIAL), "m,xl,l").mlp == (0.25, 1.0, 0.5)


def test_one_granularity_on_a_model_without_nesting_is_refused():
    spec = mptc.parse(PARTIAL.replace("nested = [[1/4, 1/2, 1], none, [1/4, 1/2, 1]]", "nested = none"))
    with pytest.raises(mptc.MptcError, match="no layer has a nested MLP"):
        mptc.nested.parse_choice(spec, mlp="m")
    with pytest.raises(mptc.MptcError, match="unknown granularity 's' for layer 0"):
        mptc.nested.parse_choice(spec, heads="s")


# --- bad files and arguments -------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2") / "m"
    mptc.save(mptc.build(mptc.load(GPT2)), d)
    return d


def _damage(d: Path, how: str) -> None:
    w = d / "weights.safetensors"
    data = w.read_bytes()
    if how == "truncated":
        w.write_bytes(data[: len(data) // 2])
    elif how == "cut-header":
        w.write_bytes(data[:40])
    elif how == "empty":
        w.write_bytes(b"")
    elif how == "garbage":
        w.write_bytes(b"this is not a safetensors file\n" * 10)
    elif how == "int":
        sd = mptc.load_model(d).state_dict()
        save_file({k: torch.ones(v.shape, dtype=torch.int32) for k, v in sd.items()}, str(w))


DAMAGE = {"truncated": "cannot read weights from", "cut-header": "cannot read weights from",
          "empty": "cannot read weights from", "garbage": "cannot read weights from",
          "int": "holds int32 values; weights must be floating point"}
COMMANDS = {
    "run": lambda d, out: ["run", str(d), "--ids", "1 2 3"],
    "compile": lambda d, out: ["compile", str(d), "-o", str(out / "x.onnx")],
    "grow": lambda d, out: ["grow", str(d), "-p", "grow_mlp(factor = 2.0)", "-o", str(out / "g")],
    "export-hf": lambda d, out: ["export-hf", str(d), "-o", str(out / "hf")],
    "verify": lambda d, out: ["verify", GPT2, str(d)],
}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_weights(gpt2_dir, tmp_path, capsys, command, how):
    d = tmp_path / "m"
    d.mkdir()
    for f in gpt2_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    _damage(d, how)
    assert main(COMMANDS[command](d, tmp_path)) == 1
    err = _err(capsys)
    assert str(d / "weights.safetensors") in err and DAMAGE[how] in err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "g").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("content", [b"hello\n", b"", bytes(range(256)) * 4], ids=["text", "empty", "binary"])
def test_run_onnx_of_a_file_that_is_not_onnx(tmp_path, capsys, content):
    f = tmp_path / "m.onnx"
    f.write_bytes(content)
    assert main(["run", GPT2, "--ids", "1 2 3", "--onnx", str(f)]) == 1
    err = _err(capsys)
    assert f"cannot load {f} as an ONNX model" in err
    with pytest.raises(mptc.MptcError, match="cannot load .* as an ONNX model"):
        mptc.run_onnx(f, {"input_ids": np.ones((1, 3), dtype=np.int64)})


def test_run_onnx_of_another_model(gpt2_dir, tmp_path, capsys):
    mptc.export_onnx(mptc.build(mptc.load(VIT)), tmp_path / "vit.onnx")
    assert main(["run", GPT2, "--ids", "1 2 3", "--onnx", str(tmp_path / "vit.onnx")]) == 1
    assert f"{tmp_path / 'vit.onnx'} needs the input pixel_values" in _err(capsys)


def _bad_npy(tmp_path: Path, what: str) -> str:
    p = tmp_path / f"{what}.npy"
    if what == "zero-bytes":
        p.write_bytes(b"")
    elif what == "not-npy":
        p.write_text("1 2 3\n")
    elif what == "no-elements":
        np.save(p, np.zeros((0,), dtype=np.int64))
    elif what == "no-rows":
        np.save(p, np.zeros((0, 3), dtype=np.int64))
    elif what == "string-mask":
        np.save(p, np.array([["1", "1", "0"]]))
    elif what == "mask-2":
        np.save(p, np.array([[1, 2, 1]]))
    elif what == "float-mask":
        np.save(p, np.array([[1.0, 0.5, 1.0]]))
    elif what == "string-pixels":
        np.save(p, np.full((1, 3, 32, 32), "x"))
    elif what == "no-images":
        np.save(p, np.zeros((0, 3, 32, 32), dtype=np.float32))
    elif what == "object":
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return str(p)


BAD_RUNS = [
    ("ids-zero-bytes", ["--ids-file", "zero-bytes"], "cannot read {f} as a .npy array"),
    ("ids-not-npy", ["--ids-file", "not-npy"], "cannot read {f} as a .npy array"),
    ("ids-object", ["--ids-file", "object"], "cannot read {f} as a .npy array"),
    ("ids-no-elements", ["--ids-file", "no-elements"], "token ids must be a (B, T) array with B ≥ 1 and T ≥ 1"),
    ("ids-no-rows", ["--ids-file", "no-rows"], "token ids must be a (B, T) array with B ≥ 1 and T ≥ 1"),
    ("mask-zero-bytes", ["--ids", "1 2 3", "--mask-file", "zero-bytes"], "cannot read {f} as a .npy array"),
    ("mask-strings", ["--ids", "1 2 3", "--mask-file", "string-mask"],
     "{f}: attention_mask must hold integers 0 and 1, got <U1"),
    ("mask-2", ["--ids", "1 2 3", "--mask-file", "mask-2"],
     "{f}: attention_mask value 2 at position 1 (row 0) is not 0 or 1"),
    ("mask-half", ["--ids", "1 2 3", "--mask-file", "float-mask"],
     "{f}: attention_mask value 0.5 at position 1 (row 0) is not 0 or 1"),
    ("pixels-strings", ["--pixels-file", "string-pixels"], "{f}: pixel_values must be numbers, got <U1"),
    ("pixels-none", ["--pixels-file", "no-images"], "{f}: pixel_values must have shape (B, 3, 32, 32) with B ≥ 1"),
]


@pytest.mark.parametrize("case, argv, message", BAD_RUNS, ids=[c[0] for c in BAD_RUNS])
def test_run_rejects_bad_arrays(tmp_path, capsys, case, argv, message):
    spec = VIT if case.startswith("pixels") else GPT2
    argv = list(argv)
    f = _bad_npy(tmp_path, argv[-1])
    argv[-1] = f
    assert main(["run", spec, *argv]) == 1
    assert message.format(f=f) in _err(capsys)


def test_run_rejects_an_id_too_large_for_int64(capsys):
    big = "99999999999999999999999"
    assert main(["run", GPT2, "--ids", f"1 2 {big}"]) == 1
    assert f"token id {big} at position 2 (row 0) is outside the vocabulary 0..999" in _err(capsys)
    assert main(["run", GPT2, "--ids", "-99999999999999999999999 1"]) == 1
    assert "token id -99999999999999999999999 at position 0 (row 0)" in _err(capsys)


def test_run_refuses_a_huge_random_batch(capsys):
    assert main(["run", GPT2, "--random", "100000000"]) == 1
    err = _err(capsys)
    assert "--random 100000000 would make tensors of 100000000 × 16 × 1000 = 1.6e+12 values (6.4 TB)" in err
    assert re.search(r"hint: .*at most \d+", err)


def test_run_refuses_a_directory_as_output(tmp_path, capsys):
    assert main(["run", GPT2, "--ids", "1 2 3", "-o", str(tmp_path)]) == 1
    err = _err(capsys)
    assert f"-o {tmp_path} is a directory" in err and "OUT.npy" in err
    (tmp_path / "f").write_text("")
    assert main(["run", GPT2, "--ids", "1 2 3", "-o", str(tmp_path / "f" / "out.npy")]) == 1
    assert f"cannot write {tmp_path / 'f' / 'out.npy'}" in _err(capsys)


def test_verify_models_with_different_inputs(capsys):
    assert main(["verify", GPT2, VIT]) == 1
    err = _err(capsys)
    assert "the models read different inputs" in err
    assert f"{GPT2} reads input_ids, attention_mask; {VIT} reads pixel_values" in err


def test_declared_but_unread_conditions_are_optional(tmp_path, capsys):
    text = HYPER.replace("embed { positions = rope(theta = 10000.0), condition = film(hidden = 8) }",
                         "embed { positions = rope(theta = 10000.0) }").replace(
        "    hyper = [lowrank(target = q, rank = 2, hidden = 8), none]\n", "")
    spec = mptc.parse(text)
    assert spec.conditions == 4
    model = mptc.build(spec).eval()
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
    assert main(["run", _write(tmp_path, "c", text), "--ids", "1 2 3"]) == 0
    assert "logits (1, 3, 64)" in capsys.readouterr().out


def test_run_onnx_with_a_sub_network_choice_is_refused(tmp_path, capsys):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"")
    assert main(["run", _write(tmp_path, "p", PARTIAL), "--ids", "1 2", "--onnx", str(f), "--mlp", "m"]) == 1
    err = _err(capsys)
    assert "pick a sub-network of the PyTorch module; an ONNX file runs as it was compiled" in err
    assert "mptc extract SRC --mlp s -o SUB" in err and "mptc run SUB --onnx SUB.onnx" in err

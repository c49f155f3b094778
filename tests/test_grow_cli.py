"""`mptc grow`, `mptc verify` and pass text."""

from __future__ import annotations

import json

import pytest
import torch

import mptc
from mptc import passes as P
from mptc.cli import main
from mptc.passes.parse import parse_passes

LLAMA = "tests/specs/tiny-llama.mpt"


def test_grow_writes_model_report_and_verifies(tmp_path, capsys):
    out = tmp_path / "grown"
    pipe = tmp_path / "pipeline.passes"
    pipe.write_text("# two growth steps\nadd_layers(n = 1, at = 1)\ngrow_width(width = 80, init = zeros)\n")
    assert main(["grow", LLAMA, "-p", "grow_mlp(factor = 2.0, layers = [0, 2])", "--passes", str(pipe),
                 "-p", "grow_vocab(vocab = 1024)", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("max error") == 4 and f"wrote {out}" in text
    report = json.loads((out / "report.json").read_text())
    # the file's passes run first, then the -p options in order
    assert [p["name"] for p in report["passes"]] == ["add_layers", "grow_width", "grow_mlp", "grow_vocab"]
    first = report["passes"][0]
    assert {"call", "params_before", "params_after", "tensors", "max_abs_error_float64", "max_abs_error_float32",
            "seconds", "verify_seconds"} <= first.keys()
    assert all(p["max_abs_error_float64"] <= 1e-9 for p in report["passes"])
    writers = {t["tensor"]: t["claims"] for t in first["tensors"]}
    assert writers["layers.1.attn.o.weight"] == ["new tensor, zero"]
    spec = mptc.load(out)
    assert spec.width == 80 and spec.vocab == 1024 and spec.n_layers == 4
    assert [ly.mlp.hidden for ly in spec.layers] == [192, 96, 192, 96]  # indices after add_layers
    # the grown dir re-compiles to the grown function: verify against the source
    assert main(["verify", LLAMA, str(out)]) == 0
    assert "agree" in capsys.readouterr().out


def test_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    import mptc.passes.engine as E

    real = E.remap

    def tampered(model, change):
        new, cert = real(model, change)
        with torch.no_grad():
            new.get_parameter("layers.1.attn.q.weight").mul_(1.01)  # an old entry changed
        return new, cert

    monkeypatch.setattr("mptc.passes.base.remap", tampered)
    out = tmp_path / "grown"
    assert main(["grow", LLAMA, "-p", "add_heads(n = 2)", "-o", str(out)]) == 1
    assert "layers.1.attn.q.weight: the entries taken from layers.1.attn.q.weight differ" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verify_detects_a_difference_and_onnx(tmp_path, capsys):
    assert main(["compile", LLAMA, "-o", str(tmp_path / "a.onnx")]) == 0
    assert main(["verify", LLAMA, str(tmp_path / "a.onnx")]) == 0
    assert main(["verify", LLAMA, str(tmp_path / "a.onnx"), "--seed", "1"]) == 1
    assert "DIFFER" in capsys.readouterr().out


@pytest.mark.parametrize("text,msg,line,col", [
    ("grow_mpl(hidden = 96)", "unknown pass 'grow_mpl'", 1, 1),
    ("grow_mlp(hiden = 96)", "unknown argument 'hiden' for grow_mlp()", 1, 18),
    ("grow_mlp(hidden = 9.5)", "hidden must be a whole number", 1, 19),
    ("grow_mlp(hidden = 96, layers = [0, true])", "layers must be a layer index", 1, 36),
    ("add_heads(n = 2, mode = both)", "mode", 1, 25),
    ("grow_mlp(hidden = 96, init = randn)", "init must be zeros, normal", 1, 30),
    ("grow_mlp(hidden = 96)\nadd_layers(n = )", "unexpected ')'", 2, 16),
])
def test_pass_text_errors_are_located(text, msg, line, col):
    with pytest.raises(mptc.SpecError) as e:
        for p in parse_passes(text, "-p 1"):
            p.requires(mptc.build(mptc.load(LLAMA)))
    assert msg in e.value.message and (e.value.line, e.value.col) == (line, col)


def test_pass_text_builds_the_same_objects_as_python():
    got = parse_passes("grow_mlp(4096), add_heads(n = 4, mode = kv, layers = 2), "
                       "grow_width(width = 1024, init = normal(std = 0.01)), add_layers(n = 1, init = copy(0.001))")
    assert got == [P.grow_mlp(hidden=4096), P.add_heads(n=4, mode="kv", layers=[2]),
                   P.grow_width(width=1024, init=P.Init("normal", 0.01)), P.add_layers(n=1, init=P.Init("copy", 0.001))]

"""The command line: exit codes, messages, outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mptc.cli import main

GPT2 = "tests/specs/tiny-gpt2.mpt"


def test_check_ok(capsys):
    assert main(["check", "examples/llama-style.mpt"]) == 0
    assert "ok: llama_style: 12 layers" in capsys.readouterr().out


def test_check_error_is_located_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.mpt"
    bad.write_text("model m {\n  vocab = 10\n  width = 16\n  layers 2 { attention { haeds = 2 } }\n  head lm { }\n}\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:4:26: error: unknown field 'haeds' in attention")
    assert "did you mean 'heads'?" in err and "Traceback" not in err


def test_missing_file_exits_1(capsys):
    assert main(["check", "nope.mpt"]) == 1
    assert "no such file: nope.mpt" in capsys.readouterr().err


def test_summary_json(capsys):
    assert main(["summary", "examples/gpt2-small.mpt", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["params"] == 124_439_808 and s["vocab"] == 50257 and len(s["layers"]) == 12
    assert s["layers"][0]["tensors"]["layers.0.attn.q.weight"] == [768, 768]


def test_summary_table(capsys):
    assert main(["summary", "tests/specs/tiny-vit.mpt"]) == 0
    out = capsys.readouterr().out
    assert "tiny_vit" in out and "layers 0–1 ×2" in out and "total" in out


def test_fmt_check_and_write(tmp_path, capsys):
    f = tmp_path / "m.mpt"
    f.write_text("model m {vocab=10,context=8\nwidth=16\nlayers 1 {attention{heads=2}, mlp{hidden=8}}\nhead lm{}}\n")
    assert main(["fmt", str(f), "--check"]) == 1
    assert "would reformat" in capsys.readouterr().err
    assert main(["fmt", str(f), "--write"]) == 0
    assert main(["fmt", str(f), "--check"]) == 0
    assert "  layers 1 {\n    attention { heads = 2 }\n" in f.read_text()


def test_compile_run_and_compare(tmp_path, capsys):
    d, onnx_file = tmp_path / "gpt2", tmp_path / "gpt2.onnx"
    assert main(["compile", GPT2, "-o", str(d), "--seed", "3"]) == 0
    assert main(["compile", str(d), "-o", str(onnx_file)]) == 0
    assert main(["compile", str(d), "-o", str(tmp_path / "gpt2.pt2")]) == 0
    capsys.readouterr()
    npy = tmp_path / "logits.npy"
    assert main(["run", str(d), "--ids", "1 2 3 4", "--onnx", str(onnx_file), "--compare", "-o", str(npy)]) == 0
    out = capsys.readouterr().out
    assert "logits (1, 4, 1000)" in out and "agree" in out
    torch_npy = tmp_path / "torch.npy"
    assert main(["run", str(d), "--ids", "1 2 3 4", "-o", str(torch_npy)]) == 0
    np.testing.assert_allclose(np.load(npy), np.load(torch_npy), atol=1e-4)
    # a different seed gives different weights, so the comparison fails and says so
    assert main(["run", GPT2, "--seed", "4", "--ids", "1 2 3 4", "--onnx", str(onnx_file), "--compare"]) == 1
    assert "DIFFER" in capsys.readouterr().out


def test_run_rejects_bad_ids(capsys):
    assert main(["run", GPT2, "--ids", "1 2 5000"]) == 1
    assert "token id 5000 at position 2 (row 0) is outside the vocabulary 0..999" in capsys.readouterr().err
    assert main(["run", GPT2, "--ids", "1 two"]) == 1
    assert "--ids must be whole numbers" in capsys.readouterr().err
    assert main(["run", "tests/specs/tiny-vit.mpt", "--ids", "1"]) == 1
    assert "reads images" in capsys.readouterr().err


def test_run_ids_file_with_mask(tmp_path, capsys):
    ids = np.array([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    assert main(["run", "tests/specs/tiny-bert.mpt", "--ids-file", str(tmp_path / "ids.npy"),
                 "--mask-file", str(tmp_path / "mask.npy")]) == 0
    assert "logits (2, 3)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["compile", "--help"], ["run", "--help"]])
def test_help_reads_well(argv):
    r = subprocess.run([sys.executable, "-m", "mptc", *argv], capture_output=True, text=True)
    assert r.returncode == 0
    assert "usage: mptc" in r.stdout


def test_usage_error_exits_nonzero_without_traceback():
    r = subprocess.run([sys.executable, "-m", "mptc", "compile", GPT2], capture_output=True, text=True)
    assert r.returncode == 1 and "the following arguments are required: -o/--output" in r.stderr
    assert "Traceback" not in r.stderr

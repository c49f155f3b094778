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


# --- `mptc run` says what each head's output is ---------------------------------------------------

def _run_head(tmp_path, capsys, head: str) -> tuple[list[str], np.ndarray]:
    """Run tiny-bert with another head on two rows (the first padded at its end): printed lines, output."""
    bert_head = "head classify { classes = 3, pool = first, pooler = true }"
    text = open("tests/specs/tiny-bert.mpt").read().replace(bert_head, f"head {head}")
    assert f"head {head}" in text
    spec, ids, mask, npy = (tmp_path / n for n in ("m.mpt", "ids.npy", "mask.npy", "out.npy"))
    spec.write_text(text)
    np.save(ids, np.array([[1, 2, 3, 0], [4, 5, 6, 7]]))
    np.save(mask, np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    capsys.readouterr()
    assert main(["run", str(spec), "--ids-file", str(ids), "--mask-file", str(mask), "-o", str(npy)]) == 0
    return capsys.readouterr().out.splitlines(), np.load(npy)


def test_run_token_classification_prints_a_class_per_token(tmp_path, capsys):
    lines, out = _run_head(tmp_path, capsys, "classify { classes = 3, pool = none }")
    assert lines[0] == "tiny_bert (PyTorch): logits (2, 4, 3)" and out.shape == (2, 4, 3)
    c = out.argmax(-1)
    assert lines[1] == f"  row 0: class per token (argmax; - padding) {c[0, 0]} {c[0, 1]} {c[0, 2]} -"
    assert lines[2] == "  row 1: class per token (argmax; - padding) " + " ".join(str(x) for x in c[1])
    assert "next tokens" not in "\n".join(lines)


def test_run_span_head_prints_the_best_span(tmp_path, capsys):
    lines, out = _run_head(tmp_path, capsys, "span { }")
    assert lines[0] == "tiny_bert (PyTorch): logits (2, 4, 2)"
    for b, real in enumerate([3, 4]):  # brute force over start ≤ end among the real positions
        s, e = out[b, :real, 0], out[b, :real, 1]
        i, j = max(((i, j) for i in range(real) for j in range(i, real)), key=lambda p: s[p[0]] + e[p[1]])
        assert lines[1 + b] == (f"  row {b}: best span positions {i}–{j} (start logit {s[i]:.3f} + end logit "
                                f"{e[j]:.3f}; top start {s.argmax()}, top end {e.argmax()})")
    assert "next tokens" not in "\n".join(lines)


def test_run_head_none_prints_the_hidden_state_shape(tmp_path, capsys):
    lines, out = _run_head(tmp_path, capsys, "none { }")
    assert lines == ["tiny_bert (PyTorch): last_hidden_state (2, 4, 64)",
                     "  hidden states: 2 rows × 4 positions × 64 (width); head none makes no predictions",
                     f"wrote {tmp_path / 'out.npy'}"]


def test_run_lm_predicts_after_each_rows_last_real_token(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([[1, 2, 3, 0], [4, 5, 6, 7]]))
    np.save(tmp_path / "mask.npy", np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert main(["run", GPT2, "--ids-file", str(tmp_path / "ids.npy"), "--mask-file", str(tmp_path / "mask.npy"),
                 "--top", "2", "-o", str(tmp_path / "out.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = np.load(tmp_path / "out.npy")
    for b, p in enumerate([2, 3]):  # row 0 ends in padding: its next token follows position 2
        top = np.argsort(-out[b, p])[:2]
        assert lines[1 + b] == (f"  row {b}: top next tokens after position {p}: "
                                f"{top[0]} ({out[b, p, top[0]]:.3f}), {top[1]} ({out[b, p, top[1]]:.3f})")


def test_run_multimodal_lm_counts_the_image_positions(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([[1, 2, 3, 0], [4, 5, 6, 7]]))
    np.save(tmp_path / "mask.npy", np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    np.save(tmp_path / "px.npy", np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))
    assert main(["run", "examples/mpt-multimodal.mpt", "--ids-file", str(tmp_path / "ids.npy"), "--mask-file",
                 str(tmp_path / "mask.npy"), "--pixels-file", str(tmp_path / "px.npy"), "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mpt_multimodal (PyTorch): logits (2, 20, 512)"  # 16 image patches, then 4 tokens
    assert lines[1].startswith("  row 0: top next tokens after position 18: ")
    assert lines[2].startswith("  row 1: top next tokens after position 19: ")

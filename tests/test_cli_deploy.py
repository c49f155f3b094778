"""`mptc deploy` and `mptc generate` on the command line: what they print, write, refuse and guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mptc.cli import main
from mptc.genai import generate

SPECS = Path(__file__).resolve().parent / "specs"
GPT2, BERT, NESTED = str(SPECS / "tiny-gpt2.mpt"), str(SPECS / "tiny-bert.mpt"), str(SPECS / "nested-lm.mpt")


def _deploy(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["deploy", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def llama_dir(llama_decoder, tmp_path_factory) -> Path:
    """The shared Llama deployed (genai profile) through the command line."""
    out = tmp_path_factory.mktemp("cli") / "llama"
    assert main(["deploy", str(llama_decoder.model_dir), "-o", str(out)]) == 0
    return out


def test_deploy_prints_what_it_chose(llama_decoder, tmp_path, capsys):
    code, out, _ = _deploy(capsys, str(llama_decoder.model_dir), "-o", str(tmp_path / "d"), "--runtime", "portable",
                           "--weights", "int4", "--max-length", "32")
    assert code == 0
    assert ("profile portable: KV cache returned whole each step (past_present_share_buffer false); max length 32; "
            "weights int4") in out
    assert "int4 weights: " in out and "as MatMulNBits (symmetric, block 32)" in out
    assert "config.json for Optimum: llama" in out and "model.onnx.data: " in out
    assert out.rstrip().endswith(f"wrote {tmp_path / 'd'}")
    cfg = json.loads((tmp_path / "d" / "genai_config.json").read_text())
    assert cfg["model"]["context_length"] == 32 and cfg["search"]["max_length"] == 32


def test_deploy_refusals(tmp_path, capsys):
    code, _, err = _deploy(capsys, GPT2, "-o", str(tmp_path / "a"), "--max-length", "100")
    assert code == 1
    assert err.startswith("error: --max-length 100 is beyond the context 64 of 'tiny_gpt2', whose learned positions "
                          "have no embedding past it")
    assert 'hint: use --max-length 64 or less, or grow the context first' in err
    code, _, err = _deploy(capsys, str(SPECS.parent.parent / "examples" / "mpt-token-types.mpt"), "-o",
                           str(tmp_path / "b"))
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: cannot deploy 'mpt_token_types' with a KV cache: per-type modulation "
                          "(layers.0.modulate, layers.1.modulate); token types (embed.types)")
    code, _, err = _deploy(capsys, BERT, "-o", str(tmp_path / "c"), "--weights", "int8")
    assert code == 1 and "error: --weights int8 applies to decoders; 'tiny_bert' is an encoder" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_deploy_guards_its_output(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = _deploy(capsys, GPT2, "-o", str(out), "--runtime", "portable")
    assert code == 1
    assert f"error: {out} exists and is not a deploy dir written by `mptc deploy`" in err
    assert "pass --force to replace it" in err and (out / "notes.txt").read_text() == "keep me"
    assert _deploy(capsys, GPT2, "-o", str(out), "--runtime", "portable", "--force")[0] == 0
    assert not (out / "notes.txt").exists() and (out / "deploy.json").is_file()
    assert _deploy(capsys, GPT2, "-o", str(out), "--runtime", "portable")[0] == 0  # an earlier deploy dir: replaced
    code, _, err = _deploy(capsys, str(out / "deploy.json"), "-o", str(out))
    assert code == 1 and "it is a directory that holds an input of this command" in err


def test_deploy_encoder_says_no_cache(tmp_path, capsys):
    code, out, _ = _deploy(capsys, BERT, "-o", str(tmp_path / "e"))
    assert code == 0
    assert "encoder: ONNX only, no cache (as `mptc compile` writes it)" in out
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["deploy.json", "model.onnx", "model.onnx.data"]
    assert main(["generate", str(tmp_path / "e"), "--ids", "1 2", "--max-new-tokens", "2"]) == 1
    assert "is an encoder deploy dir: it has no genai_config.json" in capsys.readouterr().err


def test_generate_json(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--ids", "5 17 42 9", "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"new_ids", "tokens_per_s", "prefill_ms"}
    assert len(out["new_ids"]) == 1 and len(out["new_ids"][0]) == 12
    assert all(0 <= t < 256 for t in out["new_ids"][0])
    assert out["tokens_per_s"] > 0 and out["prefill_ms"] > 0


def test_generate_streams_then_reports_speed(llama_dir, tmp_path, capsys):
    ids = np.array([[5, 17, 42, 9], [8, 1, 200, 33]])
    np.save(tmp_path / "ids.npy", ids)
    assert main(["generate", str(llama_dir), "--ids-file", str(tmp_path / "ids.npy"), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    rows = [list(map(int, line.split())) for line in out.out.strip().splitlines()]  # one line per row
    want = generate(llama_dir, ids, 5).new_ids
    assert rows == want and [generate(llama_dir, row, 5).new_ids[0] for row in ids] == want
    assert out.err.startswith("10 new tokens, ") and " tokens/s, prefill " in out.err
    assert out.err.rstrip().endswith(" ms")
    calls = []  # one call per token, as each comes
    generate(llama_dir, ids[:1], 5, on_token=lambda row, t: calls.append((row, t)))
    assert calls == [(0, t) for t in want[0]]


def test_generate_deploy_dir_equals_model_dir(llama_decoder, llama_dir, capsys):
    args = ["--ids", "5 17 42 9 130 2", "--max-new-tokens", "24", "--json"]
    assert main(["generate", str(llama_dir), *args]) == 0
    onnx_ids = json.loads(capsys.readouterr().out)["new_ids"]
    assert main(["generate", str(llama_decoder.model_dir), *args]) == 0
    torch_out = json.loads(capsys.readouterr().out)
    assert torch_out["new_ids"] == onnx_ids and torch_out["tokens_per_s"] > 0
    assert main(["generate", str(llama_decoder.model_dir), "--ids", "5 17 42 9 130 2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == [str(t) for t in onnx_ids[0][:3]] and "3 new tokens" in out.err


def test_generate_refusals(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--ids", "5 6", "--max-new-tokens", "127"]) == 1
    err = capsys.readouterr().err
    assert "error: the prompt (2 tokens) and 127 new tokens exceed the max length 128 of" in err
    assert "deploy again with a larger --max-length" in err
    assert main(["generate", str(llama_dir), "--ids", "5 256", "--max-new-tokens", "2"]) == 1
    assert "token id 256 at position 1 (row 0) is outside the vocabulary 0..255" in capsys.readouterr().err
    assert main(["generate", str(llama_dir), "--ids", "5", "--max-new-tokens", "2", "--top-p", "1.5"]) == 1
    assert "--top-p must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_generate_samples_reproducibly(llama_dir, capsys):
    args = ["generate", str(llama_dir), "--ids", "5 17", "--max-new-tokens", "16", "--temperature", "1.5",
            "--top-k", "50", "--json"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["new_ids"])
    assert runs[0] == runs[1] and runs[0] != runs[2]

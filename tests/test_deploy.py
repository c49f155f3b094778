"""Deploy dirs: ONNX Runtime GenAI and Optimum load them as they are and generate what transformers and
mptc's PyTorch `generate` do; quantized dirs run too; refusals name the feature and the fix."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import mptc
from mptc.deploy import deploy
from mptc.errors import MptcError
from mptc.genai import generate
from mptc.generate import generate as torch_generate

from .decoders import prompt

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "tests" / "specs"
OPTIMUM = ROOT / ".venv-optimum" / "bin" / "python"  # scripts/optimum-env.sh
OPTIMUM_READY = ROOT / ".venv-optimum" / ".mptc-installed"  # written once its install finished
STEPS = 64
TOL = 1e-4  # first-step logits, float32 graph vs the original weights


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """deployed(decoder, runtime, weights) → the deploy dir, written once per module."""
    root, made = tmp_path_factory.mktemp("deploy"), {}

    def get(dec, runtime: str, weights: str = "float32") -> Path:
        key = (dec.name, runtime, weights)
        if key not in made:
            made[key] = deploy(dec.model_dir, root / "-".join(key), runtime=runtime, weights=weights).path
        return made[key]

    return get


def _row(dec) -> torch.Tensor:
    return prompt(dec.spec.vocab)[0][1:2]  # (1, 6): the unpadded row of the shared prompt


def _steps(dec, t: int) -> int:
    """64 new tokens, or as many as learned positions allow (GPT-2's 64 positions hold 58 after 6)."""
    return min(STEPS, (dec.spec.context or STEPS + t) - t)


_REFERENCE: dict[str, tuple[list[int], np.ndarray]] = {}


@torch.no_grad()
def _transformers(dec, ids: torch.Tensor, n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation (n ids) and its prompt's last logits (V,), once per decoder."""
    if dec.name not in _REFERENCE:
        new = dec.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        _REFERENCE[dec.name] = new[0, ids.shape[1]:].tolist(), dec.hf(ids).logits[0, -1].numpy()
    return _REFERENCE[dec.name]


def _config(d: Path) -> dict:
    return json.loads((d / "genai_config.json").read_text())


@pytest.mark.parametrize("runtime", ["genai", "portable"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_genai_matches_transformers(family, runtime, deployed, request):
    dec = request.getfixturevalue(f"{family}_decoder")
    d = deployed(dec, runtime)
    ids = _row(dec)
    n = _steps(dec, ids.shape[1])
    want, logits = _transformers(dec, ids, n)
    got = generate(d, ids.numpy(), n)
    assert got.new_ids == [want]
    np.testing.assert_allclose(got.first_logits[0], logits, atol=TOL, rtol=0)
    cfg = _config(d)
    assert cfg["search"]["past_present_share_buffer"] is (runtime == "genai")
    dec_cfg = cfg["model"]["decoder"]
    assert (dec_cfg["num_hidden_layers"], dec_cfg["hidden_size"], cfg["model"]["vocab_size"]) == (2, 64, 256)
    assert json.loads((d / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("runtime", ["genai", "portable"])
def test_grown_matches_pytorch_generate(runtime, grown_decoder, tmp_path):
    dec = grown_decoder
    done = deploy(dec.model_dir, tmp_path / "d", runtime=runtime)
    ids = prompt(dec.spec.vocab, batch=3)[0][1:]  # (2, 6), two full rows
    got = generate(done.path, ids.numpy(), STEPS)
    want = torch_generate(dec.model, ids, STEPS)
    assert got.new_ids == want.tolist()
    with torch.no_grad():
        last = dec.model(input_ids=ids, attention_mask=torch.ones_like(ids))[:, -1].numpy()
    np.testing.assert_allclose(got.first_logits, last, atol=TOL, rtol=0)
    # per-layer cache shapes from the graph; genai_config's single numbers are layer 0's
    manifest = json.loads((done.path / "deploy.json").read_text())
    assert [ly["kv_heads"] for ly in manifest["layers"]] == [a.kv_heads for a in
                                                             (ly.attention for ly in dec.spec.layers)]
    assert len({ly["kv_heads"] for ly in manifest["layers"]}) > 1
    assert _config(done.path)["model"]["decoder"]["num_key_value_heads"] == manifest["layers"][0]["kv_heads"]
    assert not (done.path / "config.json").exists()
    assert "Optimum's config cannot hold per-layer kv heads" in done.hf_missing
    assert done.share_buffer is (runtime == "genai")


def test_no_id_ends_generation(llama_decoder, deployed, tmp_path):
    """mptc models have no end token; GenAI's own search would end a row at `pad_token_id` (its stand-in when
    `eos_token_id` is empty), so generate picks the tokens itself: a new id equal to it goes on."""
    import shutil

    d = shutil.copytree(deployed(llama_decoder, "portable"), tmp_path / "d")
    ids = _row(llama_decoder).numpy()
    before = generate(d, ids, 8).new_ids[0]
    cfg = _config(d)
    assert cfg["model"]["eos_token_id"] == []
    cfg["model"]["pad_token_id"] = before[2]
    (d / "genai_config.json").write_text(json.dumps(cfg))
    assert generate(d, ids, 8).new_ids[0] == before


OPTIMUM_RUN = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from optimum.onnxruntime import ORTModelForCausalLM
out = {}
for d, ids, n in json.loads(sys.argv[1]):
    model = ORTModelForCausalLM.from_pretrained(d)
    x = torch.tensor(ids)
    new = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    out[d] = new[:, x.shape[1]:].tolist()
print(json.dumps(out))
"""


def test_optimum_loads_portable_dirs(llama_decoder, qwen2_decoder, gpt2_decoder, deployed):
    if not OPTIMUM_READY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{OPTIMUM} is missing: scripts/setup.sh runs scripts/optimum-env.sh to make it")
        pytest.skip("no Optimum environment (bash scripts/optimum-env.sh)")
    jobs, want = [], {}
    for dec in (llama_decoder, qwen2_decoder, gpt2_decoder):
        d, ids = deployed(dec, "portable"), _row(dec)
        n = _steps(dec, ids.shape[1])
        jobs.append([str(d), ids.tolist(), n])
        want[str(d)] = [_transformers(dec, ids, n)[0]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run([str(OPTIMUM), "-c", OPTIMUM_RUN, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == want


def _nbits(d: Path, attr: str = "bits") -> list[int]:
    """The attribute `attr` of every MatMulNBits in d's graph."""
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    return [next(a.i for a in n.attribute if a.name == attr) for n in model.graph.node if n.op_type == "MatMulNBits"]


def _rel_rms(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_quantized_dirs_generate(llama_decoder, deployed):
    """int4 and int8 dirs hold MatMulNBits of their bits at accuracy level 4, load and generate under GenAI, and
    their first-step logits stay near float. Round-to-nearest with one scale per block of 32 leaves each weight an
    error of about step/√12, step = max|w|/8 (int4) or /128 (int8), and level 4 rounds the activations to int8
    per block too: on these Gaussian-weight models that is measured as a relative RMS logit error of 0.16–0.26
    (int4) and 0.015–0.026 (int8) for Llama, Qwen2, GPT-2 and Mistral (0.012–0.017 for int8 with float
    activations, level 0). The bounds leave ~25% headroom over the worst measured."""
    dec, ids = llama_decoder, _row(llama_decoder).numpy()
    f = generate(deployed(dec, "genai"), ids, 16)
    err = {}
    for weights, bits in (("int4", 4), ("int8", 8)):
        d = deployed(dec, "genai", weights)
        found = _nbits(d)
        # per layer: packed q/k/v, o, gate, up, down (some packed by the emitter); and the lm head
        assert found and set(found) == {bits} and len(found) >= 4 * dec.spec.n_layers + 1
        assert _nbits(d, "accuracy_level") == [4] * len(found)
        assert "lm head quantized" in json.loads((d / "deploy.json").read_text())["quantized"]
        assert (d / "model.onnx.data").stat().st_size < (deployed(dec, "genai") / "model.onnx.data").stat().st_size
        q = generate(d, ids, 16)
        assert len(q.new_ids[0]) == 16
        assert q.first_logits.argmax() == f.first_logits.argmax()
        err[weights] = _rel_rms(q.first_logits, f.first_logits)
    assert err["int4"] < 0.33 and err["int8"] < 0.033, err
    assert err["int4"] > 6 * err["int8"], err  # the bits are what quantize: 16× finer weight steps, ~10× less error


def test_float16_dir_generates(llama_decoder, tmp_path):
    dec = llama_decoder
    done = deploy(dec.model_dir, tmp_path / "h", weights="float16")
    ids = _row(dec)
    got = generate(done.path, ids.numpy(), 8)
    with torch.no_grad():
        last = dec.model(input_ids=ids, attention_mask=torch.ones_like(ids))[0, -1].numpy()
    assert np.abs(got.first_logits[0] - last).max() < 0.05 * np.abs(last).max()
    assert json.loads((done.path / "config.json").read_text())["torch_dtype"] == "float16"


def test_head_size_the_kernel_rejects_falls_back(tmp_path):
    """head_dim 12: GroupQueryAttention refuses it on CPU, so every layer takes the portable form, the cache is
    not shared, and the notes say so; GenAI runs the dir and agrees with the PyTorch model."""
    done = deploy(SPECS / "tiny-llama.mpt", tmp_path / "d", runtime="genai")
    assert not done.share_buffer and _config(done.path)["search"]["past_present_share_buffer"] is False
    assert any("layer 0: portable attention (head_dim 12 is not a multiple of 16" in n for n in done.notes)
    model = mptc.load_model(SPECS / "tiny-llama.mpt").eval()
    ids = torch.tensor([[5, 17, 256, 3]])
    got = generate(done.path, ids.numpy(), 4)
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=torch.ones_like(ids))[0, -1].numpy()
    np.testing.assert_allclose(got.first_logits[0], last, atol=TOL, rtol=0)


def test_refuses_what_no_profile_covers(tmp_path):
    with pytest.raises(MptcError) as e:
        deploy(ROOT / "examples" / "mpt-token-types.mpt", tmp_path / "d")
    assert ("cannot deploy 'mpt_token_types' with a KV cache: per-type modulation (layers.0.modulate, "
            "layers.1.modulate); token types (embed.types)" in str(e.value))
    assert "mptc compile SRC -o OUT.onnx" in e.value.hint
    assert not (tmp_path / "d").exists()


def test_refusal_names_portable_when_only_genai_cannot(monkeypatch, tmp_path):
    import mptc.emit

    monkeypatch.setattr(mptc.emit, "unsupported", lambda spec, cache, profile: ["logit softcap (head.softcap)"]
                        if profile == "genai" else [])
    with pytest.raises(MptcError) as e:
        deploy(SPECS / "tiny-gpt2.mpt", tmp_path / "d")
    assert "the genai profile cannot express 'tiny_gpt2': logit softcap (head.softcap)" in str(e.value)
    assert "--runtime portable" in e.value.hint


def test_refuses_max_length_past_learned_positions(tmp_path):
    with pytest.raises(MptcError) as e:
        deploy(SPECS / "tiny-gpt2.mpt", tmp_path / "d", max_length=65)
    assert "--max-length 65 is beyond the context 64 of 'tiny_gpt2'" in str(e.value)
    assert 'grow_context(context = 65)' in e.value.hint


def test_generate_refuses_past_max_length(tmp_path):
    done = deploy(SPECS / "tiny-gpt2.mpt", tmp_path / "d", runtime="portable", max_length=16)
    with pytest.raises(MptcError) as e:
        generate(done.path, np.arange(1, 11)[None], 7)
    assert "the prompt (10 tokens) and 7 new tokens exceed the max length 16" in str(e.value)
    assert "--max-length" in e.value.hint
    assert len(generate(done.path, np.arange(1, 11)[None], 6).new_ids[0]) == 6


def test_failed_deploy_leaves_the_earlier_dir(monkeypatch, tmp_path):
    out = tmp_path / "d"
    deploy(SPECS / "tiny-gpt2.mpt", out, runtime="portable")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import mptc.quantize

    def broken(w, bits, block=32):
        raise MptcError("quantizer broke")

    monkeypatch.setattr(mptc.quantize, "quantize_weight", broken)  # fails while the weights are written
    with pytest.raises(MptcError, match="quantizer broke"):
        deploy(SPECS / "tiny-gpt2.mpt", out, runtime="portable", weights="int4")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporaries left

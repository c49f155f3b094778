"""The torch-free path from a model dir to ONNX (mptc.emit.fast, mptc.emit.weights): the same files as the
path through a GraphModule, weights checked against the spec by name, shape and dtype, and no torch import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

import mptc
from mptc import ops, tables
from mptc.deploy import deploy
from mptc.dims import sizes
from mptc.emit import emit, unsupported
from mptc.emit.fast import check_graph, compile_onnx, covers
from mptc.emit.weights import expected, from_module, from_safetensors
from mptc.errors import MptcError
from mptc.lower import lower
from mptc.schema import parse

from .conftest import EXAMPLES, TINY, perturbed
from .test_emit_coverage import MOE
from .test_emit_direct import SPECS, model, session

ROOT = Path(__file__).resolve().parent.parent
TEXTS = SPECS | {"moe": MOE}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _model_dir(name: str, tmp: Path, dtype=None) -> tuple[torch.fx.GraphModule, Path]:
    """A perturbed tiny model saved as a model dir (weights cast to `dtype` in the file, if given)."""
    m = perturbed(parse(TEXTS[name], name))
    d = tmp / f"{name}-dir"
    mptc.save(m, d)
    if dtype is not None:
        sd = {k: v.detach().to(dtype).contiguous() for k, v in m.state_dict().items()}
        save_file(sd, str(d / "weights.safetensors"), metadata={"format": "pt"})
    return m, d


# --- the parameters a spec needs, without torch ---
@pytest.mark.parametrize("src", [*TEXTS, *(p.name for p in EXAMPLES), *(p.name for p in TINY)])
def test_expected_parameters_are_the_lowered_ones(src):
    paths = {p.name: p for p in [*EXAMPLES, *TINY]}
    spec = parse(TEXTS[src], src) if src in TEXTS else mptc.load(paths[src])
    want = expected(spec)
    if want is None:  # parts the list does not cover: the emitter refuses them too
        assert unsupported(spec, cache=False)
        return
    dims = sizes(spec)
    got = {k: tuple(math.prod(dims[s] for s in ax) for ax in info.axes)
           for k, info in lower(spec, "meta").params.items()}
    assert want == got


def test_tables_are_the_pytorch_models():
    x = torch.empty(1, 40, 30)
    np.testing.assert_allclose(tables.sinusoidal(40, 30), ops.sinusoidal(x).numpy(), atol=1e-6, rtol=0)
    for text in ("rope(theta = 10000.0)", "rope(theta = 500000.0, scaling = llama3(factor = 8.0, low = 1.0, "
                 "high = 4.0, original = 16))", "rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 16, "
                 "beta_fast = 16.0))", "rope(theta = 10000.0, scaling = linear(factor = 2.0))"):
        spec = parse(f"model m {{ vocab = 10\n context = 48\n width = 32\n embed {{ positions = {text} }}\n"
                     "layers 1 { attention { heads = 2 }\n mlp { hidden = 64 } }\n head lm { } }", "m")
        pos, sc = spec.embed.positions, spec.embed.positions.scaling
        inv = tables.rope_inv_freq(16, pos.theta, sc)  # the constants the lowered graph holds too
        att = sc.attention if sc is not None and sc.kind == "yarn" else 1.0
        cos, sin = tables.rope_table(inv, 48, att)
        tc, ts = ops.scaled_rope_tables(torch.empty(1, 48, 1), tuple(inv.tolist()), att)
        np.testing.assert_allclose(cos, tc.numpy(), atol=1e-6)
        np.testing.assert_allclose(sin, ts.numpy(), atol=1e-6)


# --- the same files through both paths ---
def _initializers(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("name,dtype", [("llama", "float32"), ("hetero", "float32"), ("gpt2", "float16"),
                                        ("bert", "float32"), ("vit", "float16"), ("moe", "float32")])
def test_compile_writes_the_same_file(name, dtype, tmp_path):
    m, d = _model_dir(name, tmp_path)
    slow, fast = tmp_path / "slow.onnx", tmp_path / "fast.onnx"
    mptc.export_onnx(mptc.load_model(d, dtype=dtype), slow)
    assert compile_onnx(d, fast, dtype=dtype) == fast
    assert fast.read_bytes() == slow.read_bytes()  # graph and weights, bit for bit
    spec = mptc.spec_of(m)
    feed = {k: v.numpy() for k, v in mptc.example_inputs(spec, batch=2, seq=6).items()}
    feed = {k: v.astype(np.float16) if v.dtype == np.float32 and dtype == "float16" else v for k, v in feed.items()}
    a, b = (session(onnx.load(str(p))).run(None, feed)[0] for p in (slow, fast))
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,runtime,weights", [("llama", "genai", "float32"), ("hetero", "portable", "float32"),
                                                  ("gqa", "genai", "float16"), ("gemma2", "portable", "float16")])
def test_deploy_writes_the_same_dir(name, runtime, weights, tmp_path):
    m, d = _model_dir(name, tmp_path)
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    deploy(mptc.load_model(d), slow, runtime=runtime, weights=weights)
    deploy(d, fast, runtime=runtime, weights=weights)
    a, b = _files(slow), _files(fast)
    assert a.keys() == b.keys()
    for k in a:
        if k == "deploy.json" or k == "genai_config.json":
            assert json.loads(a[k]) == json.loads(b[k]), k
        else:
            assert a[k] == b[k], k  # model.onnx and model.onnx.data bit for bit


def test_bfloat16_and_float64_files_read_as_load_model_reads_them(tmp_path):
    for dt, dtype in ((torch.bfloat16, "float32"), (torch.float64, "float16"), (torch.float64, "float32")):
        _, d = _model_dir("llama", tmp_path, dtype=dt)
        slow, fast = tmp_path / "slow.onnx", tmp_path / "fast.onnx"
        mptc.export_onnx(mptc.load_model(d, dtype=dtype), slow)
        compile_onnx(d, fast, dtype=dtype)
        assert fast.read_bytes() == slow.read_bytes(), (dt, dtype)
    w = from_safetensors(d)["embed.tokens.weight"]
    assert w.dtype == np.float64 and w.shape == (mptc.load(d).vocab, 64)


def test_module_weights_are_the_parameters_without_a_copy():
    m = model("llama")
    ws = from_module(m)
    p = m.get_parameter("layers.0.attn.q.weight")
    arr = ws["layers.0.attn.q.weight"].load()
    assert arr.ctypes.data == p.data_ptr() and arr.shape == tuple(p.shape)


def test_emit_from_a_spec_needs_its_weights():
    spec = parse(SPECS["llama"], "llama")
    with pytest.raises(MptcError, match="needs its weights"):
        emit(spec)


# --- the weights file against the spec ---
def _broken(tmp: Path, change) -> Path:
    m, d = _model_dir("llama", tmp)
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    change(sd)
    save_file(sd, str(d / "weights.safetensors"))
    return d


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.pop("layers.1.mlp.up.weight"), r"does not fit the spec: missing layers\.1\.mlp\.up\.weight"),
    (lambda sd: sd.update(extra=torch.zeros(2)), "does not fit the spec: unexpected extra"),
    (lambda sd: sd.update({"head.norm.weight": torch.ones(3)}), r"'head\.norm\.weight' has shape \(3,\), the spec "
     r"needs \(64,\)"),
    (lambda sd: sd.update({"head.norm.weight": torch.ones(64, dtype=torch.int32)}), "'head.norm.weight' holds int32 "
     "values; weights must be floating point"),
])
def test_weights_that_do_not_fit_are_refused_as_load_model_refuses_them(change, message, tmp_path):
    d = _broken(tmp_path, change)
    with pytest.raises(MptcError, match=message) as fast:
        compile_onnx(d, tmp_path / "x.onnx")
    with pytest.raises(MptcError) as slow:
        mptc.load_model(d)
    assert str(fast.value) == str(slow.value) and fast.value.hint == slow.value.hint
    assert not (tmp_path / "x.onnx").exists()


def test_a_damaged_weights_file_is_named(tmp_path):
    _, d = _model_dir("llama", tmp_path)
    f = d / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(MptcError, match=r"cannot read weights from .*weights\.safetensors") as e:
        compile_onnx(d, tmp_path / "x.onnx")
    assert "damaged" in e.value.hint


def test_what_the_fast_path_leaves_to_the_traced_one(tmp_path):
    _, d = _model_dir("llama", tmp_path)
    assert compile_onnx(d, tmp_path / "x.onnx", dtype="bfloat16") is None  # the traced export's dtype
    assert compile_onnx(ROOT / "tests" / "specs" / "tiny-llama.mpt", tmp_path / "x.onnx") is None  # a spec: random init
    assert not covers(mptc.load(ROOT / "examples" / "mpt-moe-embed.mpt"))
    assert not (tmp_path / "x.onnx").exists()


# --- the command line: no torch, and none of the heavy imports (sympy alone costs 0.2-0.4 s) ---
DRIVER = """
import sys
import mptc.cli
rc = mptc.cli.main(sys.argv[1:])
heavy = [m for m in ("torch", "sympy", "onnx_ir", "onnxscript", "transformers") if m in sys.modules]
print(",".join(heavy) or "NONE", rc)
"""


@pytest.mark.parametrize("argv", [["compile", "{d}", "-o", "{t}/x.onnx"], ["compile", "{d}", "-o", "{t}/h.onnx",
                                  "--dtype", "float16", "--external-data"], ["deploy", "{d}", "-o", "{t}/dep"],
                                  ["deploy", "{d}", "-o", "{t}/dep4", "--weights", "int4"]])
def test_the_cli_never_imports_torch_for_a_model_dir(argv, tmp_path):
    m, d = _model_dir("llama", tmp_path)
    args = [a.format(d=d, t=tmp_path) for a in argv]
    res = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True)
    assert res.stdout.split()[-2:] == ["NONE", "0"], res.stderr[-2000:]
    if argv[0] == "compile":
        out = Path(args[3])
        sess = session(onnx.load(str(out)))
        spec = mptc.spec_of(m)
        ids = mptc.example_inputs(spec, batch=1, seq=5)["input_ids"]
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
        m = m.half() if "float16" in argv else m
        with torch.no_grad():
            ref = m(input_ids=ids).float().numpy()
        np.testing.assert_allclose(got.astype(np.float32), ref, atol=1e-2 if "float16" in argv else 1e-4)
    else:
        assert (Path(args[3]) / "genai_config.json").is_file()


def test_the_check_sees_a_bad_graph_without_its_weights():
    em = emit(model("llama"))
    check_graph(em.model)  # a good graph passes
    x = em.model.graph.input[0].name
    em.model.graph.node.append(onnx.helper.make_node("NoSuchOp", [x], ["bad"]))
    with pytest.raises(MptcError, match="fails onnx.checker: .*NoSuchOp"):
        check_graph(em.model)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_an_encoder_deploys_from_a_model_dir_without_torch(dtype, tmp_path):
    """`mptc deploy DIR` of an encoder (a BERT classifier): the no-cache ONNX of `mptc compile`, written by the
    torch-free path; the same file the PyTorch path writes, and PyTorch's logits within tolerance."""
    m, d = _model_dir("bert", tmp_path)
    out = tmp_path / "dep"
    res = subprocess.run([sys.executable, "-c", DRIVER, "deploy", str(d), "-o", str(out), "--weights", dtype],
                         capture_output=True, text=True)
    assert res.stdout.split()[-2:] == ["NONE", "0"], res.stderr[-2000:]
    assert "encoder: ONNX only, no cache" in res.stdout
    assert json.loads((out / "deploy.json").read_text())["decoder"] is False
    traced = tmp_path / "traced"
    deploy(mptc.load_model(d, dtype=dtype), traced, weights=dtype)  # a module: the PyTorch path
    assert (out / "model.onnx.data").read_bytes() == (traced / "model.onnx.data").read_bytes()
    spec = mptc.spec_of(m)
    feeds = {k: v.numpy() for k, v in mptc.example_inputs(spec, batch=2, seq=7).items()}
    got = session(onnx.load(str(out / "model.onnx"))).run(None, feeds)[0]
    m = m.half() if dtype == "float16" else m
    with torch.no_grad():
        ref = m(**{k: torch.from_numpy(v) for k, v in feeds.items()}).float().numpy()
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=1e-2 if dtype == "float16" else 1e-4)

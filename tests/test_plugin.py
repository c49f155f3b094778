"""Passes written outside the package: register, plugins, entry points, per-entry scales, typed arguments."""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import mptc
from mptc import passes as P
from mptc.cli import main
from mptc.model import load_model
from mptc.passes.parse import parse_passes
from mptc.passes.verify import exact_values

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugins" / "split_mlp.py"
LLAMA, GPT2 = "tests/specs/tiny-llama.mpt", "tests/specs/tiny-gpt2.mpt"


@pytest.fixture(autouse=True)
def registry():
    """Each test sees the built-in passes only, whatever it registers."""
    before = dict(P.PASSES)
    yield P.PASSES
    P.PASSES.clear()
    P.PASSES.update(before)


def split(units=(0, 3), **kw):
    P.load_plugin(PLUGIN)
    return P.PASSES["split_mlp"](units=list(units), **kw)


# --- the example plugin, end to end ------------------------------------------------------------


@pytest.mark.parametrize("spec,hidden", [(LLAMA, 96), (GPT2, 256)])
def test_split_mlp_plugin_from_the_cli(spec, hidden, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["grow", spec, "--plugin", str(PLUGIN), "-p", "split_mlp(units = [0, 3])", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    (r,) = report["passes"]
    assert r["name"] == "split_mlp" and r["max_abs_error_float64"] <= 1e-9 and r["max_abs_error_float32"] <= 1e-5
    down = {t["tensor"]: t for t in r["tensors"]}["layers.0.mlp.down.weight"]
    halved = [0, 3, hidden, hidden + 1]
    assert "old entries scaled per entry along axis 1: ×0.5 on 4 entries (0, 3, " \
           f"{hidden}, {hidden + 1}), ×1 on rest" in down["claims"]
    assert down["scale"] == {"axis": 1, "factors": [{"factor": 0.5, "count": 4, "entries": halved},
                                                    {"factor": 1.0, "count": hidden - 2}]}
    assert "axis 1: 2 copies" in down["claims"] and not any("permutation" in c for c in down["claims"])
    assert [ly.mlp.hidden for ly in mptc.load(out).layers] == [hidden + 2] * len(mptc.load(spec).layers)
    # the weights: copied up rows, halved down columns on both copies
    old, new = load_model(spec), load_model(out)
    up_old, up_new = old.get_parameter("layers.1.mlp.up.weight"), new.get_parameter("layers.1.mlp.up.weight")
    assert torch.equal(up_new[:hidden], up_old) and torch.equal(up_new[hidden:], up_old[[0, 3]])
    d_old, d_new = old.get_parameter("layers.1.mlp.down.weight"), new.get_parameter("layers.1.mlp.down.weight")
    assert torch.equal(d_new[:, halved], torch.cat([d_old[:, [0, 3]], d_old[:, [0, 3]]], 1) * 0.5)
    assert torch.equal(d_new[:, 1:3], d_old[:, 1:3])
    assert main(["verify", spec, str(out)]) == 0 and "agree" in capsys.readouterr().out


def test_split_mlp_refuses_bad_units():
    model = load_model(LLAMA)
    with pytest.raises(P.PassRefused, match=r"units must be distinct indices 0\.\.95 of layer 0's un-nested MLP"):
        P.Pipeline([split(units=(0, 96))])(model)
    with pytest.raises(P.PassRefused, match="got \\[2, 2\\]"):
        P.Pipeline([split(units=(2, 2))])(model)


def test_doc_code_block_is_the_plugin_file():
    doc = (ROOT / "docs" / "write-a-pass.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks and blocks[0] == PLUGIN.read_text()


# --- per-entry scales: the claim is checked exactly ----------------------------------------------

LIAR = '''
from dataclasses import dataclass

from mptc.passes import PASSES, load_plugin, register, remap

load_plugin({plugin!r})


@register
@dataclass
class LyingSplit(PASSES["split_mlp"]):
    """Halves the down columns, as split_mlp does, but claims {claim}."""

    name = "lying_split"

    def apply(self, model):
        new, cert = remap(model, self.change(model))
        for c in cert.claims:
            if c.name.endswith("mlp.down.weight"):
                c.scale = {claim}
        return new, cert
'''


@pytest.mark.parametrize("claim,says", [
    ("1.0", "layers.0.mlp.down.weight: the entries taken from layers.0.mlp.down.weight differ from it"),
    # × 0.5 on the wrong units: 1 and 3 instead of 0 and 3
    ("c.scale.index_fill(1, __import__('torch').tensor([0, 1]), 1.0).index_fill(1, __import__('torch')"
     ".tensor([1]), 0.5)",
     "layers.0.mlp.down.weight: the entries taken from layers.0.mlp.down.weight differ from it × its claimed "
     "per-entry scale along axis 1 (×0.5 on 4, ×1 on 94 entries)"),
])
def test_a_wrong_per_entry_claim_fails_the_certificate(claim, says, tmp_path, capsys):
    liar = tmp_path / "liar.py"
    liar.write_text(LIAR.format(plugin=str(PLUGIN), claim=claim))
    out = tmp_path / "out"
    assert main(["grow", LLAMA, "--plugin", str(liar), "-p", "lying_split(units = [0, 3])", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: lying_split(units = [0, 3]) produced an inconsistent model")
    assert says in err and "(check failed: the pass ran but its result is wrong; nothing was written)" in err
    assert not out.exists()


def test_per_entry_scale_reaches_exact_values_and_the_optimizer():
    model = load_model(LLAMA)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = {"input_ids": torch.randint(0, 1000, (2, 8))}
    model(**x).float().pow(2).mean().backward()
    opt.step()
    new, report = P.Pipeline([split()])(model, optimizer=opt)
    name = "layers.2.mlp.down.weight"
    old_w, new_w = model.get_parameter(name), new.get_parameter(name)
    f = torch.ones(98, dtype=torch.float64)
    f[[0, 3, 96, 97]] = 0.5
    src = list(range(96)) + [0, 3]
    _, cert = split().apply(model)
    exact = exact_values(model, new, cert)
    assert set(exact) == {f"layers.{i}.mlp.down.weight" for i in range(3)}
    assert torch.equal(exact[name], old_w.detach().double()[:, src] * f)
    st_old, st_new = opt.state[old_w], report.optimizer.state[new_w]
    assert torch.allclose(st_new["exp_avg"], st_old["exp_avg"][:, src] * f.float(), rtol=0, atol=0)
    assert torch.allclose(st_new["exp_avg_sq"], st_old["exp_avg_sq"][:, src] * (f * f).float(), rtol=0, atol=0)
    assert st_new["exp_avg"].dtype == st_old["exp_avg"].dtype and int(st_new["step"]) == int(st_old["step"])


def test_a_per_entry_scale_that_does_not_fit_is_refused():
    model = load_model(LLAMA)

    @dataclass
    class Bad(P.Pass):
        name = "bad_scale"
        handles = P.KNOWN_ROLES

        def change(self, model):
            return P.Change(P.spec_of(model), scale=lambda name, info: torch.ones(3, 5) if info.role == "mlp.down"
                            else 1.0)

    with pytest.raises(mptc.MptcError, match=r"layers\.0\.mlp\.down\.weight: a per-entry scale of shape \(3, 5\) "
                       r"does not fit the tensor's shape \(64, 96\) along one axis"):
        Bad().apply(model)


# --- arguments typed by their fields ---------------------------------------------------------------


@dataclass
class Typed(P.Pass):
    name = "typed"
    ratio: float = 1.0
    count: int = 1
    flag: bool = False
    tag: str = "a"
    ids: list[int] = field(default_factory=list)
    limit: int | None = None
    init: P.Init = field(default_factory=P.Init)


def test_arguments_follow_the_field_types():
    P.register(Typed)
    (t,) = parse_passes('typed(ratio = 0.5, count = 3, flag = true, tag = "x y", ids = [1, 2], limit = 7, '
                        'init = normal(std = 0.02))')
    assert t == Typed(0.5, 3, True, "x y", [1, 2], 7, P.Init("normal", 0.02))
    (t,) = parse_passes("typed(1, tag = name, ids = 4, limit = none)")
    assert t == Typed(ratio=1.0, tag="name", ids=[4]) and isinstance(t.ratio, float)


@pytest.mark.parametrize("text,msg,col", [
    ('typed(ratio = "half")', "ratio must be a number, got a string (ratio: float)", 15),
    ("typed(count = 2.5)", "count must be a whole number, got a number (count: int)", 15),
    ("typed(flag = 1)", "flag must be true or false, got an integer (flag: bool)", 14),
    ("typed(ids = [1, true])", "ids must be a whole number or a list of them, got a boolean (ids: list[int])", 17),
    ("typed(limit = [3])", "limit must be a whole number, got a list (limit: int | None)", 15),
    ("typed(tag = 3)", "tag must be a name or a string, got an integer (tag: str)", 13),
])
def test_a_wrong_type_is_a_located_error_naming_the_field_and_type(text, msg, col):
    P.register(Typed)
    with pytest.raises(mptc.SpecError) as e:
        parse_passes(text, "-p 1")
    assert e.value.message == msg and (e.value.line, e.value.col) == (1, col)


# --- registering, plugin files, entry points ------------------------------------------------------


def test_register_makes_a_pass_known_and_guards_names():
    assert "typed" not in P.PASSES
    assert P.register(Typed) is Typed and P.PASSES["typed"] is Typed
    assert P.register(Typed) is Typed  # again: the same class replaces itself

    @dataclass
    class Other(P.Pass):
        name = "typed"

    with pytest.raises(mptc.MptcError, match=r"a pass named 'typed' is already registered \(by .*Typed\)"):
        P.register(Other)
    with pytest.raises(mptc.MptcError, match="a registered pass needs a name that text can call"):
        P.register(dataclass(type("Nameless", (P.Pass,), {})))
    with pytest.raises(mptc.MptcError, match="register takes a Pass dataclass"):
        P.register(int)


@pytest.mark.parametrize("body,msg", [
    ("1 / 0\n", "failed to import: ZeroDivisionError: division by zero"),
    ("from mptc.passes import Pas\n", "failed to import: ImportError: cannot import name 'Pas'"),
    ("x = 1\n", "registers no pass"),
])
def test_a_broken_plugin_file_is_an_error_naming_it(body, msg, tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(body)
    assert main(["grow", LLAMA, "--plugin", str(bad), "-p", "grow_mlp(hidden = 128)", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: plugin {bad} ") and msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_missing_plugin_file(tmp_path, capsys):
    assert main(["grow", LLAMA, "--plugin", str(tmp_path / "no.py"), "-p", "grow_mlp(hidden = 128)",
                 "-o", str(tmp_path / "o")]) == 1
    assert f"error: cannot read plugin {tmp_path / 'no.py'}: no such file" in capsys.readouterr().err


def test_entry_points_load_on_demand(tmp_path, monkeypatch):
    (tmp_path / "ep_passes.py").write_text(PLUGIN.read_text().replace('"split_mlp"', '"ep_split"'))
    (tmp_path / "ep_broken.py").write_text("raise RuntimeError('no torch here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("ep_split", "ep_passes:SplitMLP", "mptc.passes"),
           importlib.metadata.EntryPoint("ep_broken", "ep_broken:X", "mptc.passes")]
    asked = []

    def entry_points(group=None):
        asked.append(group)
        return [e for e in eps if e.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert "ep_split" not in P.PASSES
    (p,) = parse_passes("ep_split(units = [1])")
    assert asked == ["mptc.passes"] and p.name == "ep_split" and p.units == [1] and "ep_split" in P.PASSES
    new, report = P.Pipeline([p])(load_model(LLAMA))
    assert report.passes[0].max_abs_error_float64 <= 1e-9 and new.get_parameter("layers.0.mlp.up.weight").shape[0] == 97
    with pytest.raises(mptc.MptcError, match=r"the pass 'ep_broken' \(entry point ep_broken:X\) failed to load: "
                       "RuntimeError: no torch here"):
        parse_passes("ep_broken()")
    with pytest.raises(mptc.SpecError, match="unknown pass 'ep_splt'") as e:
        parse_passes("ep_splt()")
    assert e.value.hint == "did you mean 'ep_split'?"


# --- pipelines compose; refused vs failed ----------------------------------------------------------


def test_a_pipeline_nests_and_reports_every_inner_pass():
    inner = P.Pipeline([P.grow_mlp(hidden=128), split(units=(5,))])
    assert isinstance(inner, P.Pipeline) and str(inner).startswith("pipeline(grow_mlp(hidden = 128")
    new, report = P.Pipeline([inner, P.Pipeline([P.add_layers(n=1)]), P.grow_vocab(vocab=1100)])(load_model(LLAMA))
    assert [r.name for r in report.passes] == ["grow_mlp", "split_mlp", "add_layers", "grow_vocab"]
    assert all(r.max_abs_error_float64 <= 1e-9 for r in report.passes)
    spec = P.spec_of(new)
    assert spec.n_layers == 4 and spec.vocab == 1100 and [ly.mlp.hidden for ly in spec.layers] == [129] * 4
    unchecked = P.Pipeline([P.Pipeline([P.grow_mlp(hidden=128)], check=False), P.add_layers(n=1)])
    _, report = unchecked(load_model(LLAMA))
    errors = [r.max_abs_error_float64 for r in report.passes]
    assert errors[0] != errors[0] and errors[1] <= 1e-9  # NaN: not checked


def test_refused_and_check_failed_are_pass_errors_the_cli_tells_apart(tmp_path, capsys, monkeypatch):
    model = load_model(LLAMA)
    with pytest.raises(P.PassRefused, match="cannot shrink") as e:
        P.Pipeline([P.grow_mlp(hidden=8)])(model)
    assert isinstance(e.value, P.PassError) and not isinstance(e.value, P.CheckFailed)
    assert main(["grow", LLAMA, "-p", "grow_mlp(hidden = 8)", "-o", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: grow_mlp cannot shrink the MLP hidden size of layer 0 from 96 to 8 (refused: the "
                          "pass does not apply; nothing was written)")

    real = P.remap

    def tampered(model, change):
        new, cert = real(model, change)
        with torch.no_grad():
            new.get_parameter("layers.0.mlp.up.weight").mul_(1.01)
        return new, cert

    monkeypatch.setattr("mptc.passes.base.remap", tampered)
    with pytest.raises(P.CheckFailed, match="produced an inconsistent model") as e:
        P.Pipeline([P.grow_mlp(hidden=128)])(model)
    assert isinstance(e.value, P.PassError)
    assert main(["grow", LLAMA, "-p", "grow_mlp(hidden = 128)", "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: grow_mlp(hidden = 128, init = normal) produced an inconsistent model")
    assert "(check failed: the pass ran but its result is wrong; nothing was written)" in err

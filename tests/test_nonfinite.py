"""NaN and infinity never pass a check: `mptc verify`, the pipeline's behaviour check and its
certificate all fail on a model whose outputs or new weights are not finite (NaN compares false
with every tolerance, so `err > tol` alone would let it through)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import mptc
from mptc import passes as P
from mptc.cli import main
from mptc.passes import verify as V

from .conftest import tiny

NONFINITE = [float("nan"), float("inf"), float("-inf")]


def _poison(model_dir, name: str, value: float) -> None:
    """Set one entry of one tensor of a saved model to `value`."""
    path = model_dir / "weights.safetensors"
    sd = load_file(path)
    sd[name].view(-1)[0] = value
    save_file(sd, path)


@pytest.fixture
def pair(tmp_path):
    a = tmp_path / "a"
    mptc.save(tiny("gpt2"), a)
    b = tmp_path / "b"
    mptc.save(tiny("gpt2"), b)
    return a, b


def test_verify_agrees_on_equal_finite_models(pair, capsys):
    a, b = pair
    assert main(["verify", str(a), str(b)]) == 0
    assert "agree" in capsys.readouterr().out


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
def test_verify_fails_when_one_model_is_not_finite(pair, capsys, value):
    a, b = pair
    _poison(b, "layers.0.mlp.down.weight", value)
    assert main(["verify", str(a), str(b)]) == 1
    cap = capsys.readouterr()
    assert "DIFFER" in cap.out and "max abs error nan" in cap.out
    assert f"{b}: " in cap.err and "outputs are NaN or infinite" in cap.err
    assert main(["verify", str(b), str(a)]) == 1  # either side


def test_verify_fails_when_both_models_are_nan(pair, capsys):
    a, b = pair
    for d in (a, b):
        _poison(d, "head.norm.weight" if "head.norm.weight" in load_file(d / "weights.safetensors")
                else "layers.0.mlp.down.weight", float("nan"))
    assert main(["verify", str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert f"{a}: " in err and f"{b}: " in err


def test_compare_is_nan_for_nonfinite_outputs():
    x = torch.randn(2, 3, 5)
    y = x.clone()
    y[0, 1, 2] = float("nan")
    assert V.compare([x], [x]) == 0.0
    err = V.compare([x], [y])
    assert err != err  # NaN: fails every `err <= tol`
    assert V.compare([y], [x]) != V.compare([y], [x])
    assert V.nonfinite([x, y]) == 1


def test_pipeline_refuses_to_check_a_model_with_nan_outputs():
    model = tiny("gpt2")
    with torch.no_grad():
        model.get_parameter("layers.1.mlp.down.weight").view(-1)[3] = float("nan")
    with pytest.raises(P.PassError, match=r"grow_mlp.* cannot be checked: the model it was given has \d+ NaN"):
        P.Pipeline([P.grow_mlp(factor=2.0)])(model)


class _Broken(P.GrowMLP):
    """grow_mlp whose new units' input rows come out NaN: the claim (free entries) holds, the
    values do not."""

    def apply(self, model):
        new, cert = super().apply(model)
        with torch.no_grad():
            new.get_parameter("layers.0.mlp.up.weight")[-1] = float("nan")
        return new, cert


def test_certificate_rejects_nonfinite_new_entries():
    with pytest.raises(P.PassError, match=r"layers\.0\.mlp\.up\.weight: \d+ of its new entries are NaN or infinite"):
        P.Pipeline([_Broken(factor=2.0)])(tiny("gpt2"))


def test_behaviour_check_rejects_nan_outputs_of_the_new_model(monkeypatch):
    """With the certificate out of the way, the behaviour check alone still fails the pass."""
    monkeypatch.setattr(P.pipeline, "certificate_problems", lambda *a: [])
    with pytest.raises(P.PassError, match=r"produced a model with \d+ NaN or infinite outputs"):
        P.Pipeline([_Broken(factor=2.0)])(tiny("gpt2"))


def test_a_correct_pass_still_passes():
    new, report = P.Pipeline([P.grow_mlp(factor=2.0)])(tiny("gpt2"))
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5

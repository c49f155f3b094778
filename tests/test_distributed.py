"""`mptc train` on several processes (torch.distributed, gloo on loopback): the same losses as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mptc
from mptc.cli import main

from .test_train import FILES, NESTED, PLAIN

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--data", *FILES[:2], "--steps", "6", "--batch", "4", "--seq", "16", "--eval-every", "3",
        "--eval-batches", "2", "--warmup", "2", "--lr", "1e-2", "--no-progress", "--threads", "1"]
GROW = ["--grow", "3: grow_width(width = 48); grow_mlp(factor = 2)"]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m mptc train ARGS…` (loopback only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mptc", "train", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


def log_of(out: Path) -> dict:
    return json.loads((out / "log.json").read_text())


def losses(log: dict) -> list[dict[str, float]]:
    return [e["losses"] for e in log["train"]]


def assert_close(a: list[dict[str, float]], b: list[dict[str, float]], tol: float = 1e-4) -> None:
    assert len(a) == len(b) and [list(x) for x in a] == [list(y) for y in b]
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        for name in x:
            assert abs(x[name] - y[name]) <= tol, (step, name, x[name], y[name])


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("specs")
    (d / "plain.mpt").write_text(PLAIN)  # no dropout: the ranks' slices then compute what one process does
    (d / "nested.mpt").write_text(NESTED)
    return {"plain": str(d / "plain.mpt"), "nested": str(d / "nested.mpt")}


@pytest.fixture(scope="module")
def single(specs, tmp_path_factory) -> dict[str, dict]:
    """One-process runs to compare with: plain, nested and plain with a growth step."""
    d = tmp_path_factory.mktemp("single")
    runs = {"plain": [specs["plain"]], "nested": [specs["nested"]], "grow": [specs["plain"], *GROW]}
    for name, head in runs.items():
        assert main(["train", *head, *ARGS, "-o", str(d / name)]) == 0
    return {name: log_of(d / name) for name in runs}


def test_ddp_two_processes_equal_one(specs, single, tmp_path):
    out = tmp_path / "ddp"
    r = torchrun(specs["nested"], *ARGS, "-o", str(out))  # MatFormer: 4 backward passes per step, one all-reduce
    assert r.returncode == 0, r.stderr[-3000:]
    log = log_of(out)
    assert log["world_size"] == 2 and log["shard"] == "ddp" and single["nested"]["world_size"] == 1
    assert "2 processes (gloo, ddp): each takes 2 of the 4 sequences" in r.stdout
    assert r.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert_close(losses(log), losses(single["nested"]))
    assert_close([e["losses"] for e in log["eval"]], [e["losses"] for e in single["nested"]["eval"]])
    assert [e["step"] for e in log["eval"]] == [0, 3, 6]
    assert mptc.load_model(out).meta["mptc.spec"] == mptc.load(specs["nested"])  # a model dir, as one process writes


def test_fsdp_checkpoint_resumes_in_one_process(specs, single, tmp_path):
    out = tmp_path / "fsdp"
    r = torchrun(specs["plain"], *ARGS, "--shard", "fsdp", "--stop-at", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    half = log_of(out)
    assert half["world_size"] == 2 and half["shard"] == "fsdp" and len(half["train"]) == 3
    assert_close(losses(half), losses(single["plain"])[:3])
    # the checkpoint holds whole tensors: one process goes on from it, with the uninterrupted losses
    assert main(["train", "--resume", str(out), "--no-progress", "--threads", "1", "-o", str(out)]) == 0
    whole = log_of(out)
    assert whole["world_size"] == 1 and whole["shard"] is None
    assert_close(losses(whole), losses(single["plain"]))
    assert abs(whole["eval"][-1]["losses"]["full"] - single["plain"]["eval"][-1]["losses"]["full"]) <= 1e-4


def test_growth_under_ddp_with_nproc(specs, single, tmp_path, capsys):
    out = tmp_path / "grown"
    assert main(["train", specs["plain"], *ARGS, *GROW, "--nproc", "2", "-o", str(out)]) == 0  # launches torchrun
    log = log_of(out)
    assert log["world_size"] == 2 and log["shard"] == "ddp"
    (g,) = log["growth"]
    assert g["step"] == 3 and abs(g["loss_before"] - g["loss_after"]) <= 1e-5 and g["params_after"] > g["params_before"]
    assert g["params_after"] == single["grow"]["growth"][0]["params_after"]
    assert_close(losses(log), losses(single["grow"]))  # training goes on, as in one process
    assert log["train"][-1]["loss"] < g["loss_after"] - 0.1
    assert mptc.load(out / "model.mpt").width == 48


def test_batch_must_divide_among_processes(specs, tmp_path, capsys):
    out = tmp_path / "x"
    args = [specs["plain"], *ARGS, "--batch", "3", "-o", str(out)]
    assert main(["train", *args, "--nproc", "2"]) == 1  # refused before anything is launched
    err = capsys.readouterr().err
    assert "error: --batch 3 does not divide among 2 processes" in err and "use --batch 4 or 2" in err
    default = [a for i, a in enumerate(ARGS) if "--batch" not in ARGS[i - 1: i + 1]]  # the default --batch 16
    assert main(["train", specs["plain"], *default, "--nproc", "3", "-o", str(out)]) == 1
    assert "error: --batch 16 does not divide among 3 processes" in capsys.readouterr().err
    r = torchrun(*args)  # and by every rank, under torchrun itself
    assert r.returncode != 0 and "error: --batch 3 does not divide among 2 processes" in r.stderr
    assert not out.exists()


def test_each_rank_takes_its_own_rows_of_the_global_batch(monkeypatch):
    """The ranks' slices partition the global batch in order: none is shared, none is left out."""
    from mptc import distributed as D

    x = torch.arange(24).reshape(6, 4)  # (B, T)
    monkeypatch.setattr(D, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        parts.append(D.local_slice(x))
    assert [p.shape for p in parts] == [(2, 4)] * 3
    assert torch.equal(torch.cat(parts), x)

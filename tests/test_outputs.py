"""Outputs never destroy data: what `-o` may replace, the atomic swap, ONNX external data,
leftover temporaries, kills in the middle of a write, and a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

import mptc
import mptc.atomic as A
import mptc.outputs as O
from mptc.cli import main

ROOT = Path(__file__).resolve().parent.parent
GPT2 = str(ROOT / "tests" / "specs" / "tiny-gpt2.mpt")
NESTED = ROOT / "tests" / "specs" / "nested-lm.mpt"
MICRO = """model micro {
  vocab = VOCAB
  context = 16
  width = 16
  embed { positions = learned }
  layers 1 {
    norm = layernorm(eps = 1e-5)
    attention { heads = 2, mask = causal, bias = true }
    mlp { hidden = 32, activation = gelu }
  }
  head lm { norm = layernorm(eps = 1e-5), tied = true }
}
"""


def micro(tmp_path: Path, vocab: int = 64) -> str:
    """A one-layer spec file (vocab 64: 4 KB of weights; vocab 20000: 1.3 MB)."""
    p = tmp_path / f"micro-{vocab}.mpt"
    p.write_text(MICRO.replace("VOCAB", str(vocab)))
    return str(p)


def digest(model_dir: Path) -> str:
    """A hash of the weights (not of the file: safetensors orders its metadata differently run to run)."""
    h = hashlib.sha256()
    with safe_open(model_dir / "weights.safetensors", framework="pt") as f:
        for k in sorted(f.keys()):
            h.update(k.encode() + f.get_tensor(k).numpy().tobytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".mptc-" in p.name or ".tmp" in p.name)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- what -o may replace -------------------------------------------------------------------------


def test_a_dir_with_other_files_is_refused(tmp_path, capsys):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "notes.txt").write_text("notes")
    assert main(["compile", GPT2, "-o", str(work)]) == 1
    err = capsys.readouterr().err
    assert f"error: {work} exists and is not a model dir" in err
    assert f"would delete {work}/notes.txt" in err and "--force" in err
    assert tree(work) == {"notes.txt": b"notes"}


def test_a_file_is_not_replaced_by_a_model_dir_or_onnx(tmp_path, capsys):
    report = tmp_path / "report.txt"
    report.write_text("results")
    assert main(["compile", GPT2, "-o", str(report)]) == 1
    assert f"would delete the file {report}" in capsys.readouterr().err
    onnx_dir = tmp_path / "x.onnx"
    onnx_dir.mkdir()
    (onnx_dir / "keep").write_text("k")
    assert main(["compile", GPT2, "-o", str(onnx_dir)]) == 1
    assert f"{onnx_dir} exists and is not an ONNX file" in capsys.readouterr().err
    assert report.read_text() == "results" and (onnx_dir / "keep").read_text() == "k"


def test_a_model_dir_with_an_extra_file_is_refused(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["compile", GPT2, "-o", str(out)]) == 0
    (out / "mine.txt").write_text("x")
    assert main(["compile", GPT2, "--seed", "1", "-o", str(out)]) == 1
    assert f"{out} holds files that are no part of a model dir" in capsys.readouterr().err
    assert (out / "mine.txt").exists()


def test_an_output_of_the_same_kind_is_replaced(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["compile", GPT2, "-o", str(out)]) == 0
    first = digest(out)
    (out / "report.json").write_text("{}")  # as `grow` writes
    (out / "log.json").write_text("{}")  # as `train` writes
    assert main(["compile", GPT2, "--seed", "1", "-o", str(out)]) == 0
    assert digest(out) != first and sorted(os.listdir(out)) == ["model.mpt", "weights.safetensors"]
    a = mptc.load_model(out)
    b = mptc.build(mptc.load(GPT2), seed=1)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compile", GPT2, "-o", str(empty)]) == 0  # an empty dir holds nothing to lose
    assert leftovers(tmp_path) == []


def test_force_replaces_a_foreign_dir_and_file(tmp_path, capsys):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "notes.txt").write_text("notes")
    assert main(["compile", GPT2, "-o", str(work), "--force"]) == 0
    assert sorted(os.listdir(work)) == ["model.mpt", "weights.safetensors"]
    report = tmp_path / "report.txt"
    report.write_text("results")
    assert main(["compile", GPT2, "-o", str(report), "--force"]) == 0
    assert (report / "model.mpt").is_file() and leftovers(tmp_path) == []


def test_an_input_is_never_replaced(tmp_path, capsys):
    hf = tmp_path / "hf"
    mptc.to_hf(mptc.build(mptc.load(GPT2)), hf)
    before = tree(hf)
    assert main(["import-hf", str(hf), "-o", str(hf), "--force"]) == 1
    err = capsys.readouterr().err
    assert f"error: refusing to write {hf}: it is an input of this command ({hf})" in err
    assert "--force does not override this" in err and tree(hf) == before
    m = tmp_path / "m"
    assert main(["compile", GPT2, "-o", str(m)]) == 0
    assert main(["compile", str(m), "-o", str(m), "--force"]) == 1
    assert "it is an input of this command" in capsys.readouterr().err
    assert main(["compile", str(m), "-o", str(m / "x.onnx"), "--force"]) == 1
    assert f"it is inside an input of this command ({m})" in capsys.readouterr().err
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    spec = proj / "src" / "x.mpt"
    spec.write_text(Path(GPT2).read_text())
    assert main(["compile", str(spec), "-o", str(proj), "--force"]) == 1
    assert f"it is a directory that holds an input of this command ({spec})" in capsys.readouterr().err
    assert (proj / "src" / "x.mpt").is_file() and sorted(os.listdir(m)) == ["model.mpt", "weights.safetensors"]


def test_the_cwd_its_parents_and_home_are_never_replaced(tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "x.mpt").write_text(Path(GPT2).read_text())
    (proj / "README").write_text("r")
    before = tree(proj)
    monkeypatch.chdir(proj / "src")
    for out, why in [(str(proj), "a parent of the current directory"), (".", "the current directory"),
                     ("..", "a parent of the current directory"), (str(proj / "src"), "the current directory")]:
        assert main(["compile", "x.mpt", "-o", out, "--force"]) == 1
        assert f"refusing to write {out}: it is {why}" in capsys.readouterr().err
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert main(["compile", "x.mpt", "-o", "~", "--force"]) == 1
    assert "it is the home directory" in capsys.readouterr().err
    assert main(["compile", "x.mpt", "-o", str(home), "--force"]) == 1
    assert tree(proj) == before and os.listdir(home) == []
    with pytest.raises(mptc.MptcError, match="refusing to write /: it is the root directory"):
        O.check_output("/", "model", policy=O.OutputPolicy(force=True))


def test_library_save_refuses_a_foreign_dir(tmp_path):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "notes.txt").write_text("notes")
    model = mptc.build(mptc.load(GPT2))
    with pytest.raises(mptc.MptcError, match=r"mywork exists and is not a model dir.*notes\.txt") as e:
        mptc.save(model, work)
    assert "output_policy(force=True)" in e.value.hint and (work / "notes.txt").exists()
    with O.output_policy(force=True):
        mptc.save(model, work)
    assert sorted(os.listdir(work)) == ["model.mpt", "weights.safetensors"]
    with pytest.raises(mptc.MptcError, match="exists and is not an ONNX file"):
        mptc.export_onnx(model, work)  # refused before the export runs


@pytest.fixture
def nested_dir(tmp_path):
    out = tmp_path / "nested"
    mptc.save(mptc.build(mptc.load(NESTED)), out)
    return out


@pytest.mark.parametrize("command", ["grow", "reorder", "extract", "export-hf", "train", "search", "run"])
def test_every_writing_command_refuses_a_foreign_output_and_takes_force(command, nested_dir, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("some text to train on, " * 40)
    foreign = tmp_path / "foreign"
    foreign.write_text("mine")
    src = str(nested_dir)
    argv = {"grow": ["grow", GPT2, "-p", "grow_mlp(hidden = 512)", "-o"],
            "reorder": ["reorder", GPT2, "-o"],
            "extract": ["extract", src, "--mlp", "s", "-o"],
            "export-hf": ["export-hf", GPT2, "-o"],
            "train": ["train", src, "--data", str(data), "--steps", "1", "--batch", "2", "--seq", "8",
                      "--no-progress", "-o"],
            "search": ["search", src, "--budget", "params=40K", "--json"],
            "run": ["run", src, "--random", "1", "-o"]}[command]
    assert main([*argv, str(foreign)]) == 1
    err = capsys.readouterr().err
    assert f"{foreign} exists and is not" in err and "--force" in err and foreign.read_text() == "mine"
    assert main([*argv, str(foreign), "--force"]) == 0
    assert foreign.exists() and leftovers(tmp_path) == []
    if command == "run":  # an array replaces an array
        assert main([*argv, str(tmp_path / "y.npy")]) == 0 and main([*argv, str(tmp_path / "y.npy")]) == 0
        assert np.load(tmp_path / "y.npy").shape == (1, 16, 300)


def test_train_resume_updates_its_checkpoint_in_place(nested_dir, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("some text to train on, " * 40)
    ck = tmp_path / "ck"
    common = ["--batch", "2", "--seq", "8", "--no-progress", "--eval-every", "1"]
    assert main(["train", str(nested_dir), "--data", str(data), "--steps", "2", "--stop-at", "1", *common,
                 "-o", str(ck)]) == 0
    assert main(["train", "--resume", str(ck), "-o", str(ck)]) == 0
    assert sorted(os.listdir(ck)) == ["log.json", "model.mpt", "trainer.pt", "weights.safetensors"]
    assert main(["train", "--resume", str(ck), "-o", str(tmp_path), "--force"]) == 1  # holds the checkpoint
    assert "a directory that holds an input" in capsys.readouterr().err
    assert main(["train", "--resume", str(ck), "--data", str(data), "-o", str(data), "--force"]) == 1
    assert f"refusing to write {data}: it is an input of this command" in capsys.readouterr().err
    assert data.read_text().startswith("some text")


def test_fmt_write_rewrites_its_input(tmp_path):
    spec = tmp_path / "x.txt"
    spec.write_text(Path(GPT2).read_text().replace("  vocab = 1000", "  vocab    = 1000"))
    assert main(["fmt", "--write", str(spec)]) == 0
    assert "  vocab = 1000" in spec.read_text() and leftovers(tmp_path) == []


# --- the swap ---------------------------------------------------------------------------------------


def test_a_model_dir_is_swapped_in_one_step(tmp_path, monkeypatch):
    out = tmp_path / "m"
    mptc.save(mptc.build(mptc.load(GPT2), seed=0), out)
    want = digest(mptc.save(mptc.build(mptc.load(GPT2), seed=1), tmp_path / "ref"))
    calls = []
    real = A._exchange
    monkeypatch.setattr(A, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    monkeypatch.setattr(A, "_rename", lambda a, b: pytest.fail("two renames where one exchange does"))
    mptc.save(mptc.build(mptc.load(GPT2), seed=1), out)
    assert len(calls) == 1 and calls[0][1] == out and digest(out) == want
    assert leftovers(tmp_path) == []


def test_without_exchange_two_renames_and_a_cut_between_them_is_recovered(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    out = tmp_path / "m"
    mptc.save(mptc.build(mptc.load(GPT2), seed=0), out)
    old = digest(out)
    mptc.save(mptc.build(mptc.load(GPT2), seed=1), out)  # the fallback replaces
    new = digest(out)
    assert new != old and leftovers(tmp_path) == []
    # a kill between the two renames: the old dir aside, the new one (maybe partial) still a temporary
    pid = dead_pid()
    out.rename(tmp_path / f".m.mptc-{pid}.old")
    (tmp_path / f".m.mptc-{pid}.tmp").mkdir()
    (tmp_path / f".m.mptc-{pid}.tmp" / "weights.safetensors").write_bytes(b"partial")
    import mptc.model as M

    def broken(*a, **k):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(M, "save_file", broken)
    with pytest.raises(ValueError):  # the next run fails, but first puts the aside copy back
        mptc.save(mptc.build(mptc.load(GPT2), seed=2), out)
    assert digest(out) == new and leftovers(tmp_path) == []


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "m"
    gone, live = dead_pid(), subprocess.Popen(["sleep", "30"])
    try:
        for name in (f".m.mptc-{gone}.tmp", f".m.mptc-{live.pid}.tmp", f".m.mptc-{gone}-2.tmp"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights.safetensors").write_bytes(b"partial")
        (tmp_path / f".other.mptc-{gone}.tmp").mkdir()  # another destination's
        mptc.save(mptc.build(mptc.load(GPT2)), out)
        assert leftovers(tmp_path) == sorted([f".m.mptc-{live.pid}.tmp", f".other.mptc-{gone}.tmp"])
    finally:
        live.kill()
        live.wait()


def test_write_errors_become_mptc_errors(tmp_path, monkeypatch):
    import mptc.model as M

    out = tmp_path / "m"
    mptc.save(mptc.build(mptc.load(GPT2)), out)
    before = tree(out)
    for code, words in [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                        (errno.ENOSPC, "no space left on device")]:
        def fail(*a, code=code, **k):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(M, "save_file", fail)
        with pytest.raises(mptc.MptcError) as e:
            mptc.save(mptc.build(mptc.load(GPT2), seed=1), out)
        assert e.value.message == f"{words} while writing {out}"
        assert tree(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(mptc.MptcError, match="a file is in the way of its folder"):
        mptc.save(mptc.build(mptc.load(GPT2)), tmp_path / "afile" / "m")


# --- --task all: every file or none ----------------------------------------------------------------


@pytest.fixture
def tasks_spec(tmp_path):
    spec = tmp_path / "tasks.mpt"
    spec.write_text(NESTED.read_text().replace("  head lm {", "  tasks {\n    full = subnet()\n"
                                                "    small = subnet(mix = \"s\")\n  }\n  head lm {"))
    return spec


def _fake_pt2(fail_at: int | None):
    calls = []

    def export(model, path):
        calls.append(path)
        if len(calls) == fail_at:
            raise mptc.MptcError("broken on purpose")
        with A.atomic_file(path, kind="pt2") as tmp:
            tmp.write_bytes(f"new {mptc.spec_of(model).n_layers}".encode())
    return export


def test_task_all_writes_every_file_or_none(tasks_spec, tmp_path, monkeypatch, capsys):
    import mptc.export as E

    out = tmp_path / "m.pt2"
    for t in ("full", "small"):
        (tmp_path / f"m.{t}.pt2").write_bytes(b"previous")
    monkeypatch.setattr(E, "export_pt2", _fake_pt2(fail_at=2))
    assert main(["compile", str(tasks_spec), "--task", "all", "-o", str(out)]) == 1
    assert "broken on purpose" in capsys.readouterr().err
    assert [(tmp_path / f"m.{t}.pt2").read_bytes() for t in ("full", "small")] == [b"previous"] * 2
    assert leftovers(tmp_path) == []
    real = A._replace
    moved = []

    def second_fails(a, b):  # moving the second file into place fails: the first is put back
        moved.append(b)
        if len(moved) == 2:
            raise OSError(errno.EIO, "I/O error")
        real(a, b)

    monkeypatch.setattr(E, "export_pt2", _fake_pt2(fail_at=None))
    monkeypatch.setattr(A, "_replace", second_fails)
    with pytest.raises(OSError):
        main(["compile", str(tasks_spec), "--task", "all", "-o", str(out)])
    assert [(tmp_path / f"m.{t}.pt2").read_bytes() for t in ("full", "small")] == [b"previous"] * 2
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(A, "_replace", real)
    assert main(["compile", str(tasks_spec), "--task", "all", "-o", str(out)]) == 0
    assert [(tmp_path / f"m.{t}.pt2").read_bytes() for t in ("full", "small")] == [b"new 4"] * 2
    assert leftovers(tmp_path) == []


# --- ONNX external data ----------------------------------------------------------------------------


def _logits(model, x) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(**x).numpy()


@pytest.mark.slow
def test_onnx_external_data_is_named_after_the_file(tmp_path, monkeypatch):
    spec = mptc.load(micro(tmp_path))
    x = mptc.example_inputs(spec, batch=2, seq=8)
    m0, m1 = mptc.build(spec, seed=0), mptc.build(spec, seed=1)
    big = tmp_path / "out" / "big.onnx"
    big.parent.mkdir()
    # a graph of an older mptc reads data under its temporary name
    legacy = big.with_name(".big.abcd.tmp.onnx.data")
    mptc.export_onnx(m0, tmp_path / "legacy.onnx", external_data=True)
    g = onnx.load(str(tmp_path / "legacy.onnx"), load_external_data=False)
    big.write_bytes(A._relocated(g.SerializeToString(), {"legacy.onnx.data": legacy.name}))
    (tmp_path / "legacy.onnx.data").rename(legacy)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_allclose(mptc.run_onnx(big, x), _logits(m0, x), atol=1e-4)

    mptc.export_onnx(m1, big, external_data=True)
    assert sorted(os.listdir(big.parent)) == ["big.onnx", "big.onnx.data"]  # the legacy data file removed
    assert A.onnx_data_files(big) == {"big.onnx.data"}
    onnx.checker.check_model(str(big), full_check=True)
    np.testing.assert_allclose(mptc.run_onnx(big, x), _logits(m1, x), atol=1e-4)  # from another cwd
    mptc.export_onnx(m0, big, external_data=True)  # over itself: the old graph is pointed aside first
    assert sorted(os.listdir(big.parent)) == ["big.onnx", "big.onnx.data"]
    np.testing.assert_allclose(mptc.run_onnx(big, x), _logits(m0, x), atol=1e-4)
    # cut short after pointing the old graph at an aside link of its data: the next write finishes the job
    aside = big.with_name(f".big.onnx.data.mptc-{dead_pid()}.old")
    os.link(big.with_name("big.onnx.data"), aside)
    big.write_bytes(A._relocated(big.read_bytes(), {"big.onnx.data": aside.name}))
    np.testing.assert_allclose(mptc.run_onnx(big, x), _logits(m0, x), atol=1e-4)
    mptc.export_onnx(m1, big, external_data=True)
    assert sorted(os.listdir(big.parent)) == ["big.onnx", "big.onnx.data"]
    np.testing.assert_allclose(mptc.run_onnx(big, x), _logits(m1, x), atol=1e-4)
    mptc.export_onnx(m1, big)  # weights inside again: the data file goes
    assert sorted(os.listdir(big.parent)) == ["big.onnx"] and A.onnx_data_files(big) == set()
    np.testing.assert_allclose(mptc.run_onnx(big, x), _logits(m1, x), atol=1e-4)
    stray = big.with_name("big.onnx.data")
    stray.write_text("not mine")
    with pytest.raises(mptc.MptcError, match="big.onnx.data exists and big.onnx does not read it"):
        mptc.export_onnx(m0, big, external_data=True)
    assert stray.read_text() == "not mine" and leftovers(big.parent) == []


@pytest.mark.slow
def test_compile_external_data_flag(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["compile", micro(tmp_path), "--external-data", "-o", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "micro-64.mpt"]
    x = mptc.example_inputs(mptc.load(micro(tmp_path)), batch=1, seq=5)
    np.testing.assert_allclose(mptc.run_onnx(out, x), _logits(mptc.load_model(micro(tmp_path)), x), atol=1e-4)
    assert main(["compile", micro(tmp_path), "--external-data", "-o", str(tmp_path / "m")]) == 1
    assert "--external-data applies to ONNX outputs" in capsys.readouterr().err


# --- kills in the middle of a write ----------------------------------------------------------------

# The child is the `mptc` command line with every filesystem step of mptc.atomic (and the weights
# writer) slowed down, so that kills spread over a run land inside the write.
HOOK = r"""
import os, sys, time, runpy
import mptc.atomic as A
import mptc.model as M
if os.environ.get("NO_EXCHANGE"):
    A._exchange = lambda a, b: False
started = []
def slow(f):
    def g(*a, **k):
        if not started:
            started.append(1)
            sys.stderr.write("WRITE-START\n")
            sys.stderr.flush()
        time.sleep(0.1)
        return f(*a, **k)
    return g
for name in ("_rename", "_replace", "_exchange", "_link", "_remove", "_write_bytes", "_make_temp"):
    setattr(A, name, slow(getattr(A, name)))
M.save_file = slow(M.save_file)
commit_all = A._commit_all
def commit_and_say(*a, **k):
    commit_all(*a, **k)
    sys.stderr.write("WRITE-END\n")
    sys.stderr.flush()
A._commit_all = commit_and_say
if any(a.endswith(".onnx") for a in sys.argv):
    import onnx.checker
    onnx.checker.check_model = slow(onnx.checker.check_model)
sys.argv = ["mptc", *sys.argv[1:]]
runpy.run_module("mptc", run_name="__main__", alter_sys=True)
"""


def _child(argv: list[str], kill_after: float | None, exchange: bool = True) -> float:
    """Run `mptc ARGV` with the slowed writes; SIGKILL it `kill_after` s into its write. Returns the
    seconds from the first write step to the last."""
    env = dict(os.environ, NO_EXCHANGE="" if exchange else "1")
    p = subprocess.Popen([sys.executable, "-c", HOOK, *argv], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    while (line := p.stderr.readline()) and line != "WRITE-START\n":
        lines.append(line)
    assert line, "the write never started:\n" + "".join(lines)
    t0 = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    else:
        while (line := p.stderr.readline()) and line != "WRITE-END\n":
            lines.append(line)
    span = time.perf_counter() - t0
    rc = p.wait()
    rest = p.stderr.read()
    p.stderr.close()
    if kill_after is None:
        assert rc == 0 and line, "".join(lines) + rest
    return span


def _kill_times(span: float, n: int, seed: int) -> list[float]:
    """`n` moments spread over `span` seconds, one at random in each n-th of it."""
    rng = random.Random(seed)
    return [span * (i + rng.random()) / n for i in range(n)]


def _whole(out: Path) -> Path:
    """The model dir at `out`, or, after a cut between the two renames, its aside copy (which the next
    run puts back)."""
    if out.exists():
        return out
    aside = [p for p, _, tag in A.temporaries(out) if tag == "old"]
    assert len(aside) == 1, f"no output at {out}, and no aside copy"
    return aside[0]


@pytest.mark.slow
def test_killed_model_dir_write_keeps_the_previous_output(tmp_path):
    spec = micro(tmp_path)
    out = tmp_path / "out" / "m"
    ref = {s: digest(mptc.save(mptc.build(mptc.load(spec), seed=s), tmp_path / f"ref{s}")) for s in (0, 1)}
    mptc.save(mptc.build(mptc.load(spec), seed=0), out)
    for exchange in (True, False):  # RENAME_EXCHANGE, then the two-rename fallback (one step more)
        span = _child(["compile", spec, "--seed", "1", "-o", str(out)], None, exchange)
        assert digest(out) == ref[1]
        hit = 0
        for i, t in enumerate(_kill_times(span, 3, seed=7 + exchange)):
            before, seed = digest(_whole(out)), i % 2
            _child(["compile", spec, "--seed", str(seed), "-o", str(out)], t, exchange)
            hit += bool(leftovers(out.parent))
            assert digest(_whole(out)) in {before, ref[seed]}
            mptc.load_model(_whole(out))
        assert hit >= 1, "no kill landed inside the write"
    _child(["compile", spec, "--seed", "1", "-o", str(out)], None, exchange=False)
    assert digest(out) == ref[1] and leftovers(out.parent) == []


@pytest.mark.slow
def test_killed_onnx_write_keeps_the_previous_output(tmp_path):
    spec = micro(tmp_path)
    models = {s: mptc.build(mptc.load(spec), seed=s) for s in (0, 1)}
    x = mptc.example_inputs(mptc.load(spec), batch=1, seq=6)
    ref = {s: _logits(m, x) for s, m in models.items()}
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()

    def which() -> int:
        y = mptc.run_onnx(out, x)
        found = [s for s in ref if np.allclose(y, ref[s], atol=1e-4)]
        assert found, "the ONNX file is neither the old nor the new model"
        return found[0]

    mptc.export_onnx(models[0], out, external_data=True)
    span = _child(["compile", spec, "--seed", "1", "--external-data", "-o", str(out)], None)
    assert which() == 1
    hit = 0
    for i, t in enumerate(_kill_times(span, 3, seed=11)):
        before, seed = which(), i % 2
        _child(["compile", spec, "--seed", str(seed), "--external-data", "-o", str(out)], t)
        hit += bool(leftovers(out.parent))
        assert which() in {before, seed}
    assert hit >= 1, "no kill landed inside the write"
    _child(["compile", spec, "--seed", "1", "--external-data", "-o", str(out)], None)
    assert which() == 1 and sorted(os.listdir(out.parent)) == ["big.onnx", "big.onnx.data"]


# --- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root only; skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_a_full_disk_is_an_error_and_keeps_the_previous_output(small_disk, tmp_path, capsys):
    out = small_disk / "m"
    assert main(["compile", micro(tmp_path), "-o", str(out)]) == 0  # 4 KB of weights
    before = tree(out)
    big = micro(tmp_path, vocab=20000)  # 1.3 MB of weights: more than the disk
    assert main(["compile", big, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: no space left on device while writing {out}" in err and "Traceback" not in err
    assert tree(out) == before and sorted(os.listdir(small_disk)) == ["m"]
    assert main(["compile", big, "-o", str(small_disk / "new")]) == 1
    assert "no space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(small_disk)) == ["m"]


@pytest.mark.parametrize("argv", [["compile", "{d}", "-o", "{disk}/x.onnx"],
                                  ["compile", "{d}", "-o", "{disk}/x.onnx", "--external-data"],
                                  ["deploy", "{d}", "-o", "{disk}/dep"]])
def test_a_full_disk_under_the_onnx_writer_is_the_same_clean_error(argv, small_disk, tmp_path, capsys):
    d = tmp_path / "big"
    assert main(["compile", micro(tmp_path, vocab=20000), "-o", str(d)]) == 0  # 1.3 MB of weights
    capsys.readouterr()
    args = [a.format(d=d, disk=small_disk) for a in argv]
    assert main(args) == 1  # the weights are written on a background thread: its ENOSPC reaches the command
    err = capsys.readouterr().err
    assert f"error: no space left on device while writing {args[3]}" in err and "Traceback" not in err
    assert os.listdir(small_disk) == []

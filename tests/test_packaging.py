"""The wheel ships the grammar and the passes inside the package and works when installed."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (whl,) = out.glob("mptc-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "mptc/grammar/mpt.lark" in names
    assert "mptc/passes/__init__.py" in names
    assert not any(n.startswith(("passes/", "grammar/", "tests/")) for n in names)


def test_wheel_installs_into_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # dependencies are borrowed from this environment (a .pth file), so nothing is downloaded
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib, "_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    where = subprocess.run([str(py), "-c", "import mptc; print(mptc.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert where.stdout.startswith(purelib), where  # the installed copy, not the source tree
    run = subprocess.run([str(env_dir / "bin" / "mptc"), "check", str(ROOT / "examples" / "gpt2-small.mpt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok: gpt2_small: 12 layers")

"""The CLIs work from an installed wheel, run from another folder: conf/ ships inside it (setup.py),
`$LDMKIT_CONF` swaps in a user's own, and nothing reaches back into the source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # a wheel build and three fresh interpreters importing torch


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel built from a copy of the project (no build/ left in the checkout), unpacked as an install."""
    root = tmp_path_factory.mktemp("wheel")
    project, dist, site = root / "project", root / "dist", root / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", build, str(dist)], cwd=project, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("ldmkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what `pip install --no-deps --target site wheel` does for a pure-Python wheel
    return site


def run_installed(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LDMKIT_CONF")}
    environ.update(PYTHONPATH=str(site), WANDB_MODE="offline", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


def test_wheel_ships_conf_and_the_clis_find_it(site, tmp_path):
    where = run_installed(site, tmp_path, "-c",
                          "import json, ldmkit, ldmkit.config as c; print(json.dumps([ldmkit.__file__, str(c.conf_dir())]))")
    assert where.returncode == 0, where.stderr
    package, conf = map(Path, json.loads(where.stdout.splitlines()[-1]))
    assert package.is_relative_to(site) and conf == site / "ldmkit" / "conf" and (conf / "model" / "ldm.yaml").is_file()

    out = tmp_path / "shards"
    export = run_installed(site, tmp_path, "-m", "ldmkit.data.export_shards", "data=shapes", f"out={out}",
                           "num_samples=4", "shard_size=2", "data.resolution=16")
    assert export.returncode == 0, export.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]

    shown = run_installed(site, tmp_path, "-m", "ldmkit.cli.train", "--cfg", "job", "model=clip", "seed=5")
    assert shown.returncode == 0, shown.stderr
    assert "seed: 5" in shown.stdout and "ClipModule" in shown.stdout


def test_a_users_own_conf_replaces_the_packaged_one(site, tmp_path):
    own = tmp_path / "myconf"
    shutil.copytree(site / "ldmkit" / "conf", own)
    (own / "train.yaml").write_text((own / "train.yaml").read_text().replace("seed: 42", "seed: 1234"))
    shown = run_installed(site, tmp_path, "-m", "ldmkit.cli.train", "--cfg", "job", LDMKIT_CONF=str(own))
    assert shown.returncode == 0, shown.stderr
    assert "seed: 1234" in shown.stdout

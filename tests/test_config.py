"""ldmkit.config: where conf/ is found, and what compose's options do to the composed config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldmkit.config import CONF_ENV, compose, conf_dir, project_root
from tests.conftest import CONF_DIR, ROOT


def test_source_checkout_finds_its_conf(monkeypatch):
    monkeypatch.delenv(CONF_ENV, raising=False)
    assert conf_dir() == CONF_DIR and project_root() == ROOT


def test_env_var_and_argument_point_at_a_users_own_conf(tmp_path, monkeypatch):
    own = tmp_path / "myconf"
    own.mkdir()
    monkeypatch.setenv(CONF_ENV, str(own))
    assert conf_dir() == own
    assert conf_dir(CONF_DIR) == CONF_DIR  # the argument wins over the variable
    monkeypatch.setenv(CONF_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=rf"\${CONF_ENV}=.*missing: no such folder"):
        conf_dir()


def test_fallbacks_apply_unless_the_overrides_choose(tmp_path):
    assert compose(["data=shapes"], fallbacks=["model=ldm"]).model._target_.endswith("LatentDiffusionModule")
    assert compose(["model=clip"], fallbacks=["model=ldm"]).model._target_.endswith("ClipModule")


def test_only_groups_drops_the_rest_unless_chosen():
    cfg = compose([], only_groups={"data", "paths", "_self_"})
    assert "data" in cfg and "model" not in cfg and "trainer" not in cfg
    assert "model" in compose(["model=clip"], only_groups={"data", "paths", "_self_"})


def test_workdir_redirects_every_path_and_hydra_resolves(tmp_path):
    cfg = compose(["model=clip"], workdir=tmp_path, set_hydra_config=True)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    assert paths == {"root_dir": str(ROOT), "data_dir": str(tmp_path / "data"), "log_dir": str(tmp_path / "logs"),
                     "output_dir": str(tmp_path / "run"), "work_dir": str(ROOT)}
    assert "hydra" not in cfg
    assert "hydra" in compose([], return_hydra_config=True)
    assert isinstance(cfg.model, type(cfg)) and Path(cfg.paths.output_dir).parent == tmp_path

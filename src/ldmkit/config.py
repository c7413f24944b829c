"""Compose `conf/` with overrides and instantiate its groups: the one copy used by train/eval, the
CLIs (`ldmkit.cli.*`), tests and bench.

Where `conf/` is found (first hit wins):
1. the `config_dir` argument, or ``$LDMKIT_CONF`` (a user's own config folder);
2. the ``ldmkit.conf`` package data of an installed wheel (the repo's conf/, shipped by setup.py);
3. the `conf/` folder of a source checkout (beside ``pyproject.toml``, above ``src/ldmkit``).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_ENV = "LDMKIT_CONF"


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/ uses: `${run_id:}`, a short random id that makes each run folder unique
    (ldmkit.lit.run_folder). Cached: every use inside one composed config (and a multirun's jobs, which copy
    the cache) agrees."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True)


register_resolvers()


class ConfigError(ValueError):
    """A composed config cannot run; the message says what to change."""


def _packaged_conf() -> Path | None:
    spec = importlib.util.find_spec("ldmkit.conf")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "train.yaml").is_file():
            return Path(location)
    return None


def _checkout_conf() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent / "conf" if (parent / "conf" / "train.yaml").is_file() else None
    return None


def conf_dir(config_dir: str | os.PathLike | None = None) -> Path:
    """The Hydra config folder (see the module docstring for the search order)."""
    chosen = config_dir or os.environ.get(CONF_ENV)
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not path.is_dir():
            source = "config_dir" if config_dir else f"${CONF_ENV}"
            raise FileNotFoundError(f"{source}={chosen}: no such folder; point it at a folder holding train.yaml/eval.yaml")
        return path
    found = _packaged_conf() or _checkout_conf()
    if found is None:
        raise FileNotFoundError(f"cannot find ldmkit's conf/ (train.yaml); reinstall ldmkit or set {CONF_ENV}=PATH/conf")
    return found


def project_root() -> Path:
    """The folder `paths.root_dir` means for configs composed outside `python train.py`: the source
    checkout holding conf/, or the current folder when running from an installed wheel."""
    checkout = _checkout_conf()
    return checkout.parent if checkout is not None else Path.cwd()


def _default_groups(config_dir: Path, config_name: str) -> list[str]:
    import yaml

    defaults = yaml.safe_load((config_dir / f"{config_name}.yaml").read_text()).get("defaults", [])
    return [next(iter(d)) for d in defaults if isinstance(d, dict)]


def _keys(overrides: Sequence[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def compose(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    *,
    config_dir: str | os.PathLike | None = None,
    fallbacks: Sequence[str] = (),
    only_groups: Collection[str] | None = None,
    return_hydra_config: bool = False,
    set_hydra_config: bool = False,
    workdir: str | os.PathLike | None = None,
    root_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """`conf/<config_name>.yaml` with `overrides`, as `python train.py/eval.py OVERRIDES` composes it.

    - `fallbacks`: overrides applied unless `overrides` set the same key (e.g. ``model=ldm``).
    - `only_groups`: default groups outside this set are dropped unless `overrides` choose them.
    - `set_hydra_config`: register the `hydra` node as `@hydra.main` does (``${hydra:...}`` resolves);
      the node itself stays in the result only with `return_hydra_config`.
    - `workdir`: run/log/data paths go under it (``run``, ``logs``, ``data``), root/work dir is
      `root_dir` (default `project_root()`), so nothing is written elsewhere.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    folder = conf_dir(config_dir)
    chosen = _keys(overrides)
    extra = [o for o in fallbacks if o.split("=", 1)[0].lstrip("+~") not in chosen]
    if only_groups is not None:
        extra += [f"~{g}" for g in _default_groups(folder, config_name) if g not in only_groups and g not in chosen]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(folder)):
            cfg = hydra_compose(config_name=config_name, overrides=[*extra, *overrides],
                                return_hydra_config=return_hydra_config or set_hydra_config)
    finally:
        GlobalHydra.instance().clear()
    if set_hydra_config:
        HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if workdir is not None:
            redirect_paths(cfg, workdir, root_dir)
        if set_hydra_config and not return_hydra_config:
            del cfg.hydra
    return cfg


def redirect_paths(cfg: DictConfig, workdir: str | os.PathLike, root_dir: str | os.PathLike | None = None) -> None:
    """Point `cfg.paths` into `workdir` (run/, logs/, data/), root and work dir at `root_dir`."""
    workdir, root = Path(workdir), str(root_dir or project_root())
    with open_dict(cfg):
        cfg.paths.root_dir = root
        cfg.paths.output_dir = str(workdir / "run")
        cfg.paths.log_dir = str(workdir / "logs")
        cfg.paths.work_dir = root
        cfg.paths.data_dir = str(workdir / "data")


def instantiate_node(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but our own actionable errors surface as themselves rather than
    wrapped in Hydra's "Error in call to target ..." (whose traceback buries the message)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from ldmkit.artifacts import ArtifactError

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err
        while isinstance(cause, InstantiationException):  # nested targets wrap once per level
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, (ArtifactError, ConfigError, ValueError, FileNotFoundError)):
            raise cause from None
        raise


def instantiate_group(group: DictConfig | None, kind: type) -> list[Any]:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers)."""
    objects: list[Any] = []
    if not group:
        return objects
    for name, node in group.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            obj = instantiate_node(node)
            if not isinstance(obj, kind):
                raise ConfigError(f"{name}: `{node._target_}` built a {type(obj).__name__}, not a {kind.__name__}.")
            objects.append(obj)
    return objects

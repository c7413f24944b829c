"""Packaging beyond pyproject.toml: the Hydra configs in conf/ (at the repo root, where `python train.py`
finds them) ship inside the wheel as the package data `ldmkit/conf`, found by `ldmkit.config.conf_dir()`."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "ldmkit.conf"],
    package_dir={"": "src", "ldmkit.conf": "conf"},
    package_data={"ldmkit.conf": ["*.yaml", "**/*.yaml"]},
)

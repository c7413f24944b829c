"""No user-supplied file runs code: a crafted pickle handed to every loader ldmkit has is refused
with a message that says why and how to convert a trusted file, and its payload never runs.

The payload of `Payload.__reduce__` creates a marker file when unpickled (what `touch /tmp/PWNED`
did through torch-fidelity's Inception loader before this was fixed)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.nn.weights_file import UntrustedWeightsError, WeightsFileError, load_state_dict_file, pickle_globals


class Payload:
    """Unpickling this calls open(marker, "w") (pickled as io.open): stands for any code an attacker wants to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_malicious(path: Path, marker: Path, fmt: str) -> Path:
    """A state dict with one poisoned entry, saved by torch.save (zip) or pickle.dump (raw pickle);
    for .npz files, "zip" is numpy's own format with the payload in an object array."""
    state = {"weight": torch.ones(2), "bias": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip" and path.suffix == ".npz":
        np.savez(path, num_samples=np.asarray(2), mean=np.array([Payload(marker)], dtype=object))
    elif fmt == "zip":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=4)
    return path


def _inception_explicit(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.eval.inception import InceptionFeatureExtractor

    InceptionFeatureExtractor(path)


def _inception_env(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.eval import inception

    monkeypatch.setenv(inception.INCEPTION_WEIGHTS_ENV, str(path))
    inception.InceptionFeatureExtractor()


def _inception_hub_cache(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.eval import inception

    hub = inception.hub_inception_weights_path()
    hub.parent.mkdir(parents=True, exist_ok=True)
    path.rename(hub)
    assert hub.name == path.name
    inception.InceptionFeatureExtractor()


def _feature_stats_cache(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.eval.fid import FeatureStats

    FeatureStats.load(path)


def _lpips_vgg(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.nn.lpips import LPIPS

    lin = tmp_path / "vgg.pth"
    torch.save({f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}, lin)
    LPIPS(vgg_weights=path, lin_weights=lin)


def _lpips_lin(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.nn.lpips import LPIPS, _vgg16_features

    vgg = tmp_path / "vgg16-397923af.pth"
    torch.save(_vgg16_features().state_dict(), vgg)
    LPIPS(vgg_weights=vgg, lin_weights=path)


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _clip_pretrained_path(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.nn.clip import build_clip

    build_clip(model_cfg=TINY_CLIP, pretrained_path=path)


def _text_encoder_file(path: Path, tmp_path: Path, monkeypatch) -> None:
    """`model.text_encoder=FILE.pt model.text_encoder_arch=ViT-B-32` (LDM) and eval's `clip=FILE.pt`."""
    from ldmkit.nn.clip import load_text_encoder

    load_text_encoder(path, model_name="ViT-B-32")


def _lightning_checkpoint(path: Path, tmp_path: Path, monkeypatch) -> None:
    from ldmkit.pipeline import resolve_ckpt_path

    resolve_ckpt_path(str(path), tmp_path / "run")


LOADERS: dict[str, tuple[str, Callable]] = {
    "inception_path": ("weights-inception-2015-12-05-6726825d.pth", _inception_explicit),
    "LDMKIT_INCEPTION_WEIGHTS": ("inception.pth", _inception_env),
    "inception hub cache": ("weights-inception-2015-12-05-6726825d.pth", _inception_hub_cache),
    "fid stats cache": ("ref-stats.npz", _feature_stats_cache),
    "lpips vgg_weights": ("vgg16-397923af.pth", _lpips_vgg),
    "lpips lin_weights": ("vgg.pth", _lpips_lin),
    "clip pretrained_path": ("open_clip.pt", _clip_pretrained_path),
    "text_encoder=FILE.pt": ("text_encoder.pt", _text_encoder_file),
    "ckpt_path": ("last.ckpt", _lightning_checkpoint),
}


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv("LDMKIT_INCEPTION_WEIGHTS", raising=False)


@pytest.mark.parametrize("fmt", ["zip", "raw pickle"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_pickle_is_refused_and_never_runs(loader, fmt, tmp_path, monkeypatch, isolated_hub):
    filename, load = LOADERS[loader]
    marker = tmp_path / "PWNED"
    path = write_malicious(tmp_path / "user" / filename, marker, fmt)
    with pytest.raises(Exception) as info:
        load(path, tmp_path, monkeypatch)
    assert not marker.exists(), f"{loader}: the file's code ran"
    assert isinstance(info.value, ValueError), info.value  # UntrustedWeightsError; pipeline's ConfigError for ckpt_path
    message = str(info.value)
    assert "refused on purpose" in message and filename in message, message
    if loader == "ckpt_path":  # pipeline.validate_checkpoint's own wording (run-folder work, same policy)
        assert "would need to run arbitrary code" in message and "re-save it with tensors" in message, message
        return
    assert "needs arbitrary code to load" in message, message
    if loader == "fid stats cache":
        assert "delete it" in message
    else:  # how to convert a trusted file, as a command that really works (checked below)
        assert "safetensors" in message and "weights_only=False" in message
    # names what it would call (numpy does not say, so the stats cache says "pickled objects")
    assert "calls io.open" in message or (loader == "fid stats cache" and "pickled Python objects" in message)


def test_conversion_command_in_the_message_makes_a_loadable_file(tmp_path, monkeypatch):
    """The command we print turns a trusted pickle (here: a state dict with a harmless non-tensor
    object of a user class) into plain safetensors."""
    import shlex
    import subprocess
    import sys

    path = tmp_path / "trusted.pth"
    torch.save({"w": torch.arange(3.0), "b": torch.ones(2, 2).t()}, path)  # transposed: not contiguous
    from ldmkit.nn.weights_file import convert_command

    command = shlex.split(convert_command(path))
    assert command[:2] == ["python", "-c"]
    subprocess.run([sys.executable, "-c", command[2]], check=True, timeout=120)
    loaded = load_state_dict_file(tmp_path / "trusted.safetensors")
    assert torch.equal(loaded["w"], torch.arange(3.0)) and torch.equal(loaded["b"], torch.ones(2, 2))


def test_torchscript_archive_is_refused_as_a_program(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "model.pt"))
        with pytest.raises(UntrustedWeightsError, match="TorchScript archive.*refused on purpose|refused on purpose.*TorchScript"):
            load_state_dict_file(tmp_path / "model.pt")
        with pytest.raises(UntrustedWeightsError, match=r"torch\.jit\.load"):
            load_state_dict_file(tmp_path / "model.pt")


def test_corrupt_files_are_reported_as_corrupt_not_as_malicious(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(3)}, good)
    truncated, garbage = tmp_path / "truncated.pth", tmp_path / "garbage.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage.write_bytes(b"not a weights file at all")
    for path in (truncated, garbage):
        with pytest.raises(WeightsFileError, match="truncated, corrupt") as info:
            load_state_dict_file(path)
        assert not isinstance(info.value, UntrustedWeightsError)
    assert torch.equal(load_state_dict_file(good)["w"], torch.ones(3))
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsFileError, match="not a state dict"):
        load_state_dict_file(tmp_path / "list.pth")


def test_pickle_scan_finds_callables_without_running_them(tmp_path):
    marker = tmp_path / "PWNED"
    for fmt in ("zip", "raw pickle"):
        path = write_malicious(tmp_path / f"{fmt}.pth", marker, fmt)
        assert "io.open" in pickle_globals(path)  # builtins.open pickles as io.open
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pth")
    assert all(name.startswith(("torch.", "collections.")) for name in pickle_globals(tmp_path / "plain.pth"))
    np.save(tmp_path / "array.npy", np.ones(3))
    assert pickle_globals(tmp_path / "array.npy") == []  # not a pickle: nothing found, nothing raised
    assert not marker.exists()


def test_truncated_checkpoint_is_reported_as_truncated_not_as_malicious(tmp_path):
    from ldmkit.pipeline import ConfigError, resolve_ckpt_path

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}, "global_step": 3}, path)
    assert resolve_ckpt_path(str(path), tmp_path / "run") == str(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ConfigError, match="truncated or corrupt") as info:
        resolve_ckpt_path(str(path), tmp_path / "run")
    assert "refused on purpose" not in str(info.value)

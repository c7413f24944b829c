"""The latent cache: `python -m ldmkit.data.latent_cache` encodes a dataset once; data=latent_cache trains
the LDM from it with the same batches (up to fp16 storage) as encoding images on the fly, and refuses
caches made with other encoders or missing caches with errors that name the command."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from ldmkit.cli.latent_cache import main
from ldmkit.data.latent_cache import CACHE_FILE, COMMAND, LatentCacheError, read_cache_metadata
from ldmkit.data.shapes import ShapesDataset
from ldmkit.nn.autoencoder import load_autoencoder
from ldmkit.nn.clip import load_text_encoder
from ldmkit.pipeline import train
from tests.artifacts import ldm_module, write_autoencoder
from tests.lit.test_ldm import TINY

SEED, COUNT = 5, 12


def cache_argv(tiny_artifacts, out, *extra: str) -> list[str]:
    return ["data=shapes", f"seed={SEED}", "data.resolution=32", f"model.autoencoder={tiny_artifacts['autoencoder']}",
            f"model.text_encoder={tiny_artifacts['clip']}", f"out={out}", f"num_samples={COUNT}", "shard_size=4",
            "batch_size=5", *extra]


@pytest.fixture(scope="module")
def cache(tiny_artifacts, tmp_path_factory):
    """A 12-sample fp16 cache of shapes train[0:12] in 3 shards (2 train + 1 held out)."""
    return main(cache_argv(tiny_artifacts, tmp_path_factory.mktemp("caches") / "cache"))


def datamodule(path, **kwargs):
    from ldmkit.data.latent_cache import LatentCacheDataModule

    return LatentCacheDataModule(**{"batch_size": 4, "num_workers": 0, "resolution": 32, "seed": 0, "path": str(path), **kwargs})


def ordered_samples(path) -> list[dict]:
    """Every cached sample, in write order (all shards, no resampling or shuffling)."""
    from ldmkit.data.latent_cache import CachedLatentSamples

    meta = read_cache_metadata(path)
    shapes = {"latent": meta["latent_shape"], "context": meta["context_shape"], "pooled": meta["pooled_shape"]}
    return list(CachedLatentSamples([str(path / s["name"]) for s in meta["shards"]], shapes))


def shapes_batch(n: int = COUNT) -> list[dict]:
    return ShapesDataset("train", 50_000, 32, seed=SEED).__getitems__(range(n))


def test_round_trip_matches_direct_encoding(cache, tiny_artifacts):
    meta = read_cache_metadata(cache)
    assert meta["count"] == COUNT and [s["count"] for s in meta["shards"]] == [4, 4, 4]
    assert meta["latent_shape"] == [4, 8, 8] and meta["text_encoder"]["clip_skip"] == 1 and meta["dtype"] == "float16"
    samples, source = ordered_samples(cache), shapes_batch()
    assert [s["caption"] for s in samples] == [s["caption"] for s in source]
    assert [s["attributes"] for s in samples] == [s["attributes"] for s in source]
    autoencoder, *_ = load_autoencoder(tiny_artifacts["autoencoder"])
    text_encoder = load_text_encoder(tiny_artifacts["clip"])
    with torch.no_grad():
        posterior = autoencoder.encode(torch.stack([s["image"] for s in source]))
        context, pooled = text_encoder([s["caption"] for s in source])
    fp16 = dict(rtol=1e-3, atol=1e-4)  # half precision keeps 11 significant bits
    for key, expected in (("latent_mean", posterior.mean), ("latent_std", posterior.std), ("context", context), ("pooled", pooled)):
        got = torch.stack([s[key] for s in samples])
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, **fp16, msg=key)


def test_cli_is_atomic_and_refuses_to_overwrite(cache, tiny_artifacts):
    before = (cache / CACHE_FILE).read_text()
    with pytest.raises(LatentCacheError, match="overwrite=true"):
        main(cache_argv(tiny_artifacts, cache))
    assert (cache / CACHE_FILE).read_text() == before
    not_a_cache = cache.parent / "notes"
    (not_a_cache / "keep.txt").parent.mkdir()
    (not_a_cache / "keep.txt").write_text("mine")
    with pytest.raises(LatentCacheError, match="not a latent cache"):
        main(cache_argv(tiny_artifacts, not_a_cache, "overwrite=true"))
    small = main(cache_argv(tiny_artifacts, cache.parent / "small", "num_samples=3", "dtype=float32", "split=val"))
    small = main(cache_argv(tiny_artifacts, small, "num_samples=2", "overwrite=true", "split=val"))
    assert read_cache_metadata(small)["count"] == 2 and sorted(p.name for p in small.iterdir()) == ["00000.tar", CACHE_FILE]
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_fast_dev_run_trains_from_the_cache_without_encoding_images(compose_cfg, cache, tiny_artifacts, monkeypatch):
    from ldmkit.nn.autoencoder import AutoencoderKL

    def no_encode(*args, **kwargs):
        raise AssertionError("training from a latent cache must not run the autoencoder's encoder")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encode)
    cfg = compose_cfg([*TINY, "data=latent_cache", f"data.path={cache}", "data.batch_size=4", "data.num_workers=0",
                       f"model.autoencoder={tiny_artifacts['autoencoder']}", f"model.text_encoder={tiny_artifacts['clip']}",
                       "debug=fast_dev_run"])
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    batch = next(iter(objects["datamodule"].train_dataloader()))
    assert "image" not in batch and batch["latent_mean"].shape == (4, 4, 8, 8) and batch["context"].shape == (4, 16, 32)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_step_from_cache_equals_step_from_images(cache, tiny_artifacts):
    """Same global RNG state -> the same posterior noise, condition dropout, timesteps and noise in both
    paths, so the loss differs only by the fp16 rounding of the cached tensors."""
    module = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"], cond_drop_prob=0.5)
    source, cached = shapes_batch(4), ordered_samples(cache)[:4]
    from_images = {"image": torch.stack([s["image"] for s in source]), "caption": [s["caption"] for s in source]}
    from_cache = {k: torch.stack([s[k] for s in cached]) for k in ("latent_mean", "latent_std", "context", "pooled")}

    def loss(batch, seed):
        torch.manual_seed(seed)
        return module.training_step(batch, 0).detach()

    image_loss, cache_loss = loss(from_images, 0), loss(from_cache, 0)
    torch.testing.assert_close(cache_loss, image_loss, rtol=2e-3, atol=0)
    assert (loss(from_cache, 1) - image_loss).abs() > 100 * (cache_loss - image_loss).abs()  # the tolerance is tight


def test_cache_from_another_autoencoder_is_refused(compose_cfg, cache, tiny_artifacts, tmp_path):
    other = write_autoencoder(tmp_path / "other_autoencoder", seed=1)
    cfg = compose_cfg([*TINY, "data=latent_cache", f"data.path={cache}", f"model.autoencoder={other}",
                       f"model.text_encoder={tiny_artifacts['clip']}", "debug=fast_dev_run"])
    with pytest.raises(LatentCacheError, match=rf"(?s)autoencoder: the cache was encoded with .*{COMMAND} .*model.autoencoder={other}"):
        train(cfg)
    dm = datamodule(cache)
    with pytest.raises(LatentCacheError, match="clip_skip=1, but model.clip_skip=2"):
        dm.check_encoders(str(tiny_artifacts["autoencoder"]), str(tiny_artifacts["clip"]), clip_skip=2)
    dm.check_encoders(str(tiny_artifacts["autoencoder"]), str(tiny_artifacts["clip"]), clip_skip=1)  # the right ones pass


def test_missing_cache_names_the_command(compose_cfg, cache, tmp_path):
    cfg = compose_cfg(["data=latent_cache"])
    dm = instantiate(cfg.data)  # constructing never touches the disk
    assert dm.paths["train"] == str(tmp_path / "data" / "latent_cache")
    with pytest.raises(FileNotFoundError, match=f"(?s)does not exist.*{COMMAND} data=shapes model.autoencoder=PATH"):
        dm.setup("fit")
    with pytest.raises(LatentCacheError, match="set data.resolution=32"):
        datamodule(cache, resolution=64, val_path=None).setup("fit")


def test_held_out_shard_and_train_epoch(cache):
    dm = datamodule(cache)
    dm.setup("fit")
    val = [b for b in dm.val_dataloader()]
    assert sum(len(b["caption"]) for b in val) == 4
    assert [c for b in val for c in b["caption"]] == [s["caption"] for s in shapes_batch()[8:]]
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 2  # samples_per_epoch defaults to the 8 train samples
    assert set(json.dumps(a, sort_keys=True) for b in train_batches for a in b["attributes"]) <= {
        json.dumps(s["attributes"], sort_keys=True) for s in shapes_batch()[:8]}

from __future__ import annotations

import tarfile

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from ldmkit.data import shard_reader
from ldmkit.data.collate import collate_samples
from ldmkit.cli.export_shards import compose_data_config
from ldmkit.data.export_shards import export_dataset
from ldmkit.data.shapes import ShapesDataset
from ldmkit.data.skips import MissingCaptionError, SkipCounter
from ldmkit.data.webdataset import WebDatasetDataModule, WebDatasetSamples, decode_shard_sample

from .helpers import gradient_png, image_bytes, numbered_shards, sample_members, write_tar


def _ids(dataset, num_workers: int = 0) -> list[int]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [sample["attributes"].get("id", -1) for sample in loader]  # -1: json lost to a truncation


def _corrupt_shards(folder):
    """[truncated tar, garbage file, tar with bad samples]; returns paths and the ids that must survive."""
    good = numbered_shards(folder / "src", 1, 6, size=48)[0]
    with tarfile.open(good) as tar:
        fourth_image = tar.getmembers()[9]  # png of the 4th sample
    truncated = folder / "00000.tar"
    truncated.write_bytes(good.read_bytes()[: fourth_image.offset_data + 1000])  # cut inside its data
    garbage = folder / "00001.tar"
    garbage.write_bytes(b"\x00not a tar at all" * 100)
    members = sample_members("k0", gradient_png(16, 100), "fine", {"attributes": {"id": 100}})
    members += sample_members("k1", b"garbage image bytes", "broken image", {"attributes": {"id": 101}})
    members += sample_members("k2", None, "caption without image", {"attributes": {"id": 102}})
    members += sample_members("k3", gradient_png(16, 103), "also fine", {"attributes": {"id": 103}})
    mixed = write_tar(folder / "00002.tar", members)
    return [truncated, garbage, mixed]


def test_missing_data_gives_actionable_error(tmp_path):
    pattern = str(tmp_path / "laion_subset" / "{00000..00009}.tar")
    dm = WebDatasetDataModule(train_shards=pattern)  # construction never touches the disk
    with pytest.raises(FileNotFoundError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "img2dataset" in message and "data=shapes" in message and "export_shards" in message
    assert "00000.tar" in message


def test_single_shard_needs_explicit_val(tmp_path):
    shard = numbered_shards(tmp_path, 1, 2)[0]
    with pytest.raises(ValueError, match="val_shards"):
        WebDatasetDataModule(train_shards=str(shard)).setup("fit")
    dm = WebDatasetDataModule(train_shards=str(shard), val_shards=str(shard))
    dm.setup("fit")
    assert dm.shard_urls()["val"] == [str(shard)]


def test_last_shard_is_held_out(tmp_path):
    numbered_shards(tmp_path, 3, 2)
    dm = WebDatasetDataModule(train_shards=str(tmp_path / "{00000..00002}.tar"), batch_size=2, num_workers=0)
    dm.setup("fit")
    urls = dm.shard_urls()
    assert [u[-9:] for u in urls["train"]] == ["00000.tar", "00001.tar"] and urls["val"][0].endswith("00002.tar")
    assert urls["test"] == urls["val"]
    assert sorted(_ids(dm.dataset("val"))) == [4, 5]


def test_export_shapes_then_read_back_as_laion_subset(tmp_path):
    source = ShapesDataset("val", 30, 32, seed=5)
    shards = export_dataset(source, tmp_path / "out", shard_size=12, split="val")
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    dm = WebDatasetDataModule(
        batch_size=7, num_workers=0, resolution=32, train_shards=str(tmp_path / "out" / "00000.tar"),
        val_shards=str(tmp_path / "out" / "{00000..00002}.tar"),
    )
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [len(b["caption"]) for b in batches] == [7, 7, 7, 7, 2]
    images = torch.cat([b["image"] for b in batches])
    captions = [c for b in batches for c in b["caption"]]
    attributes = [a for b in batches for a in b["attributes"]]
    expected = source.__getitems__(range(30))
    assert captions == [s["caption"] for s in expected]
    assert attributes == [s["attributes"] for s in expected]
    assert (images - torch.stack([s["image"] for s in expected])).abs().max() <= 1 / 127.5 + 1e-6
    assert dm.skipped_counts("val")["total"] == 0


def test_corrupt_shards_are_skipped_and_counted_across_workers(tmp_path):
    shards = _corrupt_shards(tmp_path)
    counter = SkipCounter("test")
    dataset = WebDatasetSamples([str(p) for p in shards], 16, skips=counter)
    ids = _ids(dataset, num_workers=2)
    assert {100, 103} <= set(ids) and not {101, 102} & set(ids)
    assert sorted(i for i in ids if i < 6) == [0, 1, 2]  # the truncated shard yields what precedes the cut
    totals = counter.totals()  # read in the main process: counts come from the worker processes
    assert totals["shard_error"] == 2  # truncated + garbage, each counted once
    assert totals["decode_error"] == 1 and totals["missing_image"] == 1
    assert totals["total"] == sum(v for k, v in totals.items() if k != "total")


def test_training_continues_over_corrupt_data_and_logs_the_count(tmp_path):
    shards = _corrupt_shards(tmp_path)
    good = numbered_shards(tmp_path / "good", 1, 8, size=16)[0]
    dm = WebDatasetDataModule(
        batch_size=2, num_workers=0, resolution=16, train_shards=[str(p) for p in shards] + [str(good)],
        val_shards=str(good), resampled=False, shuffle_buffer=0, log_skips_every_n_steps=1,
    )

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step >= 5  # every good sample of the 4 shards was trained on
    logged = trainer.callback_metrics
    assert float(logged["data/skipped_train/total"]) == 4
    assert float(logged["data/skipped_train/decode_error"]) == 1


def test_split_across_ranks_and_workers_is_disjoint_and_complete(tmp_path):
    numbered_shards(tmp_path / "three", 3, 4)
    numbered_shards(tmp_path / "one", 1, 6)
    for urls, total in ((sorted((tmp_path / "three").glob("*.tar")), 12), (sorted((tmp_path / "one").glob("*.tar")), 6)):
        seen = []
        for rank in range(2):
            dataset = WebDatasetSamples([str(u) for u in urls], 16)
            dataset.set_distributed(rank, 2)
            seen += _ids(dataset, num_workers=2)
        assert sorted(seen) == list(range(total))


def test_resampled_streams_differ_per_rank_and_epoch_but_reproduce(tmp_path):
    urls = [str(p) for p in numbered_shards(tmp_path, 4, 5, size=8)]

    def stream(rank, epochs=1):
        dataset = WebDatasetSamples(urls, 8, seed=3, resampled=True, shuffle_buffer=10, samples_per_epoch=24)
        dataset.set_distributed(rank, 2)
        return [_ids(dataset) for _ in range(epochs)]

    rank0_epoch0, rank0_epoch1 = stream(0, epochs=2)
    assert len(rank0_epoch0) == 12  # 24 samples per epoch over 2 ranks
    assert rank0_epoch0 == stream(0)[0]  # deterministic for (seed, rank, worker, epoch)
    assert rank0_epoch0 != rank0_epoch1
    assert rank0_epoch0 != stream(1)[0]
    assert set(rank0_epoch0 + rank0_epoch1) <= set(range(20))


def test_filters_json_and_caption_fallbacks(tmp_path):
    members = sample_members("a", image_bytes("RGB", (8, 8)), "too small", {})
    members += sample_members("b", image_bytes("RGB", (64, 16)), "too wide", {})
    members += sample_members("c", image_bytes("L", (32, 32)), None, {"caption": "from json", "url": "x"}, ext="jpg")
    members += [("d.webp", image_bytes("RGBA", (32, 32), "WEBP", (0, 0, 0, 0))), ("d.txt", b"webp\n"),
                ("d.json", b"{broken")]
    shard = write_tar(tmp_path / "00000.tar", members)
    counter = SkipCounter()
    samples = list(WebDatasetSamples([str(shard)], 16, min_size=16, max_aspect_ratio=2.0, skips=counter))
    assert [s["caption"] for s in samples] == ["from json", "webp"]
    assert samples[0]["attributes"] == {"caption": "from json", "url": "x"}  # no "attributes": the metadata
    assert samples[1]["attributes"] == {}
    assert torch.allclose(samples[1]["image"], torch.ones(3, 16, 16))  # transparent -> white
    assert counter.totals()["too_small"] == 1 and counter.totals()["bad_aspect"] == 1


def test_decode_shard_sample_prefers_attributes_field():
    raw = {"__key__": "k", "png": gradient_png(8), "txt": b" hi ", "json": b'{"attributes": {"digit": 3}, "w": 8}'}
    sample = decode_shard_sample(raw, 8)
    assert sample["caption"] == "hi" and sample["attributes"] == {"digit": 3}
    assert collate_samples([sample, sample])["image"].shape == (2, 3, 8, 8)


def _cut_shard(tmp_path, where: str):
    """A 40-sample shard cut inside (or right before) the header of the 11th sample's first member."""
    shard = numbered_shards(tmp_path / "src", 1, 40, size=8)[0]
    with tarfile.open(shard) as tar:
        header = tar.getmembers()[30].offset  # 3 members per sample: the 11th sample starts here
    cut = tmp_path / "00000.tar"
    cut.write_bytes(shard.read_bytes()[: header + (100 if where == "in_header" else 0)])
    return cut


@pytest.mark.parametrize("where", ["in_header", "between_members"])
def test_shard_cut_in_a_header_or_between_members_is_counted(tmp_path, where):
    counter = SkipCounter("test")
    ids = _ids(WebDatasetSamples([str(_cut_shard(tmp_path, where))], 8, skips=counter))
    assert ids == list(range(10))  # what precedes the cut is kept ...
    assert counter.totals()["shard_error"] == 1  # ... and the loss of the other 30 is counted
    complete = numbered_shards(tmp_path / "whole", 1, 40, size=8)[0]
    counter.reset()
    assert _ids(WebDatasetSamples([str(complete)], 8, skips=counter)) == list(range(40))
    assert counter.total() == 0  # a complete tar (end-of-archive blocks) is not an error


def _caption_shard(folder):
    png = gradient_png(8)
    members = sample_members("a", png, "a caption", {"attributes": {"id": 0}})
    members += sample_members("b", png, None, {"attributes": {"id": 1}})  # no .txt, no caption in the json
    members += sample_members("c", png, "  ", {"attributes": {"id": 2}})  # blank .txt
    members += sample_members("d", png, "", {"caption": "from json", "attributes": {"id": 3}})  # empty .txt, json has it
    members += sample_members("e", png)  # image only
    return str(write_tar(folder / "00000.tar", members))


def test_missing_caption_policy(tmp_path):
    shard = _caption_shard(tmp_path)
    counter = SkipCounter("test")
    kept = list(WebDatasetSamples([shard], 8, skips=counter))  # default: skip and count
    assert [s["caption"] for s in kept] == ["a caption", "from json"]
    assert counter.totals()["missing_caption"] == 3 and counter.total() == 3
    counter.reset()
    kept = list(WebDatasetSamples([shard], 8, skips=counter, missing_caption="empty"))
    assert [s["caption"] for s in kept] == ["a caption", "", "", "from json", ""]
    assert counter.totals()["kept_without_caption"] == 3 and counter.total() == 0  # counted, not dropped
    with pytest.raises(MissingCaptionError, match="missing_caption=skip"):
        list(WebDatasetSamples([shard], 8, missing_caption="error"))
    with pytest.raises(ValueError, match="missing_caption"):
        WebDatasetDataModule(train_shards=shard, missing_caption="drop")
    cfg = compose_data_config(["data=laion_subset", "data.missing_caption=error"])
    assert instantiate(cfg.data).missing_caption == "error"
    assert compose_data_config(["data=laion_subset"]).data.missing_caption == "skip"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("captionless", [False, True])
def test_resampled_stream_of_unusable_shards_stops_with_a_clear_error(tmp_path, monkeypatch, num_workers, captionless):
    monkeypatch.setattr(shard_reader, "MIN_SKIPPED_SAMPLES", 50)  # forked workers inherit it
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar at all" * 100)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    head = tmp_path / "head.tar"
    head.write_bytes(numbered_shards(tmp_path / "src", 1, 2, size=8)[0].read_bytes()[:100])  # cut in header 1
    urls = [str(garbage), str(empty), str(head)]
    if captionless:  # readable, but nothing usable in it
        urls.append(str(write_tar(tmp_path / "uncaptioned.tar", sample_members("x", gradient_png(8)))))
    dataset = WebDatasetSamples(urls, 8, resampled=True, shuffle_buffer=10, samples_per_epoch=100)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    match = "were skipped, none used" if captionless else "read nothing"
    with pytest.raises(RuntimeError, match=f"{match}: no usable sample.*missing_caption"):
        next(iter(loader))


@pytest.mark.timeout(120)
def test_resampled_stream_with_some_good_shards_keeps_going(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_reader, "MIN_SKIPPED_SAMPLES", 50)
    good = numbered_shards(tmp_path, 1, 3, size=8)[0]
    bad = [tmp_path / f"bad{i}.tar" for i in range(4)]
    for path in bad:
        path.write_bytes(b"garbage" * 100)
    bad.append(write_tar(tmp_path / "uncaptioned.tar", sample_members("x", gradient_png(8))))
    counter = SkipCounter("test")
    dataset = WebDatasetSamples([str(good)] + [str(p) for p in bad], 8, resampled=True, shuffle_buffer=200,
                                samples_per_epoch=300, skips=counter)  # the buffer fills over ~70 shard reads
    assert len(_ids(dataset)) == 300 and counter.totals()["shard_error"] > 20

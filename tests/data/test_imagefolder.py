from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldmkit.data.collate import collate_samples
from ldmkit.data.imagefolder import ImageFolderDataModule, ImageFolderDataset, scan_folder, split_items
from ldmkit.data.skips import MissingCaptionError, SkipCounter

from .helpers import gradient_png


def _folder(root, n: int = 6):
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(n):
        folder = root / ("sub/deeper" if i % 2 else "")
        (folder / f"img{i}.png").write_bytes(gradient_png(20, seed=i))
        (folder / f"img{i}.txt").write_text(f"caption {i}\n")
    return root


def test_recursive_scan_with_sidecar_captions_and_attributes(tmp_path):
    root = _folder(tmp_path / "images")
    (root / "img0.json").write_text(json.dumps({"digit": 4}))
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.png").write_bytes(gradient_png(8))
    items = scan_folder(root)
    assert sorted(i.relpath for i in items) == sorted(
        [f"img{i}.png" for i in (0, 2, 4)] + [f"sub/deeper/img{i}.png" for i in (1, 3, 5)])
    dataset = ImageFolderDataset(items, 16)
    samples = {s["caption"]: s for s in (dataset[i] for i in range(len(dataset)))}
    assert set(samples) == {f"caption {i}" for i in range(6)}
    assert samples["caption 0"]["attributes"] == {"digit": 4} and samples["caption 1"]["attributes"] == {}
    assert samples["caption 0"]["image"].shape == (3, 16, 16)


def test_csv_captions_and_default_caption(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(root / f"{i}.jpg")
    (root / "captions.csv").write_text('file,caption\n0.jpg,"a red, dark square"\n1.jpg,second\nmissing.jpg,gone\n')
    dm = ImageFolderDataModule(root=str(root), captions_csv="captions.csv", default_caption="untitled",
                               val_fraction=0.0, test_fraction=0.0, num_workers=0, resolution=8)
    with pytest.warns(UserWarning, match="1 CSV rows"):
        dm.setup("fit")
    captions = sorted(s["caption"] for s in (dm.dataset("train")[i] for i in range(3)))
    assert captions == ["a red, dark square", "second", "untitled"]


def test_grayscale_rgba_and_sixteen_bit_files(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    Image.new("L", (12, 12), 200).save(root / "grey.png")
    Image.new("RGBA", (12, 12), (0, 0, 255, 0)).save(root / "clear.png")
    Image.fromarray(np.full((12, 12), 65535, dtype=np.uint16)).save(root / "deep.png")
    dataset = ImageFolderDataset(scan_folder(root), 8, missing_caption="empty")  # no captions here
    images = {item.relpath: dataset[i]["image"] for i, item in enumerate(dataset.items)}
    assert torch.allclose(images["grey.png"], torch.full((3, 8, 8), 200 / 127.5 - 1))
    assert torch.allclose(images["clear.png"], torch.ones(3, 8, 8))  # transparent on white
    assert torch.allclose(images["deep.png"], torch.ones(3, 8, 8))  # 16-bit white stays white


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "images", n=4)
    (root / "broken.png").write_bytes(b"garbage")
    (root / "cut.png").write_bytes(gradient_png(64)[:200])
    for name in ("broken", "cut"):
        (root / f"{name}.txt").write_text(f"caption {name}")  # captioned: only their bytes are broken
    dataset = ImageFolderDataset(scan_folder(root), 16)
    assert len(dataset) == 6
    batches = list(DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_samples))
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == 6 and all(c.startswith("caption") for c in captions)  # replaced by the next file
    assert dataset.skips.totals()["decode_error"] == 2  # counted in the workers, read here


def test_all_files_broken_raises_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    with pytest.raises(RuntimeError, match="could not be used"):
        ImageFolderDataset(scan_folder(tmp_path), 8, missing_caption="empty")[0]


def test_missing_and_empty_folder_errors(tmp_path):
    dm = ImageFolderDataModule(root=str(tmp_path / "nowhere"))  # construction is fine
    with pytest.raises(FileNotFoundError, match="not a folder.*data=shapes"):
        dm.setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found.*NAME.txt"):
        ImageFolderDataModule(root=str(tmp_path / "empty")).setup("fit")


def test_hash_split_is_disjoint_and_stable(tmp_path):
    items = scan_folder(_folder(tmp_path / "images", n=6))
    splits = split_items(items, 0.2, 0.2)
    names = {k: {i.relpath for i in v} for k, v in splits.items()}
    assert sum(len(v) for v in names.values()) == 6
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert names["val"] and names["test"]  # tiny folders still get one of each
    many = [type(items[0])(path=items[0].path, relpath=f"x/{i}.png", caption="") for i in range(400)]
    before = {i.relpath: s for s, v in split_items(many, 0.1, 0.1).items() for i in v}
    after = {i.relpath: s for s, v in split_items(many[:300], 0.1, 0.1).items() for i in v}
    assert all(before[k] == s for k, s in after.items())  # removing files moves nobody
    assert 20 < sum(s == "val" for s in before.values()) < 60


@pytest.mark.timeout(60)
def test_symlink_loops_are_not_followed_and_no_file_is_listed_twice(tmp_path):
    root = _folder(tmp_path / "images", n=4)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a link to a parent: a loop
    (root / "sub" / "deeper" / "up2").symlink_to(root / "sub", target_is_directory=True)  # a second loop
    (root / "alias.png").symlink_to(root / "img0.png")  # the same file under a second name
    (root / "alias.txt").write_text("caption alias")
    (root / "mirror").symlink_to(root / "sub" / "deeper", target_is_directory=True)  # a folder inside root
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in (7, 8):
        (outside / f"ext{i}.png").write_bytes(gradient_png(20, seed=i))
    (outside / "back").symlink_to(root, target_is_directory=True)  # a loop through a folder outside
    (root / "ext").symlink_to(outside, target_is_directory=True)  # followed: its files are not elsewhere
    (root / "ext2").symlink_to(outside, target_is_directory=True)  # a second link to the same place
    with pytest.warns(UserWarning, match="not followed"):
        items = scan_folder(root)
    relpaths = sorted(i.relpath for i in items)
    assert relpaths == ["ext/ext7.png", "ext/ext8.png", "img0.png", "img2.png", "sub/deeper/img1.png",
                        "sub/deeper/img3.png"]
    files = [os.stat(i.path) for i in items]
    assert len({(f.st_dev, f.st_ino) for f in files}) == len(items)  # never one file twice
    splits = split_items(items, 0.3, 0.3)
    placed = [(os.stat(i.path).st_dev, os.stat(i.path).st_ino) for v in splits.values() for i in v]
    assert len(placed) == len(set(placed)) == 6  # so no file sits in two splits


def test_missing_caption_policy(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / f"{name}.png").write_bytes(gradient_png(8, seed=ord(name)))
    (root / "a.txt").write_text("a caption")
    (root / "c.txt").write_text("  \n")  # a blank caption file; b has none at all
    counter = SkipCounter("test")
    dataset = ImageFolderDataset(scan_folder(root), 8, skips=counter)  # default: skip and count
    assert len(dataset) == 2 and counter.totals()["missing_caption"] == 1  # b, known before any read
    assert [dataset[i]["caption"] for i in range(2)] == ["a caption", "a caption"]  # c replaced by the next
    assert counter.totals()["missing_caption"] == 2 and counter.total() == 2
    counter.reset()
    dataset = ImageFolderDataset(scan_folder(root), 8, skips=counter, missing_caption="empty")
    assert [dataset[i]["caption"] for i in range(3)] == ["a caption", "", ""]
    assert counter.totals()["kept_without_caption"] == 2 and counter.total() == 0
    with pytest.raises(MissingCaptionError, match="b.png"):
        ImageFolderDataset(scan_folder(root), 8, missing_caption="error")
    (root / "b.txt").write_text("b caption")
    with pytest.raises(MissingCaptionError, match="c.png"):
        ImageFolderDataset(scan_folder(root), 8, missing_caption="error")[2]
    assert ImageFolderDataset(scan_folder(root), 8, default_caption="x")[2]["caption"] == "x"
    (root / "a.txt").unlink()
    (root / "b.txt").unlink()
    with pytest.raises(ValueError, match="none of the 2 images.*missing_caption=empty"):
        ImageFolderDataset(scan_folder(root)[:2], 8)  # a and b: no caption source at all
    with pytest.raises(ValueError, match="missing_caption"):
        ImageFolderDataModule(root=str(root), missing_caption="maybe")

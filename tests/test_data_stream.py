"""Data beyond RAM: data.stream=true decodes per item from a memory-mapped table, with the same items
as the in-memory path; data=hf reads local save_to_disk and parquet datasets; streamed runs resume exactly."""

import warnings

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose_config
from PIL import Image
from safetensors.torch import load_file

from diffx import data
from diffx.errors import DiffxError


def same_items(a: data.ImageData, b: data.ImageData):
    assert len(a.dataset) == len(b.dataset) and a.class_names == b.class_names
    assert a.dataset.captions == b.dataset.captions
    for i in range(len(a.dataset)):
        x, y = a.dataset[i], b.dataset[i]
        assert torch.equal(x["x"], y["x"]) and x["label"] == y["label"] and x["caption"] == y["caption"]


def image_column_is_memory_mapped(d: data.ImageData) -> bool:
    table = d.dataset.refs.data
    blocks = [b for row in table.blocks for b in row] if isinstance(table, datasets.table.ConcatenationTable) else [table]
    return all(isinstance(b, datasets.table.MemoryMappedTable) for b in blocks if "image" in b.column_names)


def save(path, color, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_streamed_shapes_equal_held_ones_and_stay_memory_mapped(tmp_path):
    held = data.shapes(size=16, n=40, cache_dir=str(tmp_path))
    streamed = data.shapes(size=16, n=40, cache_dir=str(tmp_path), stream=True)
    assert isinstance(streamed.dataset, data.StreamedImages)
    assert image_column_is_memory_mapped(streamed)
    same_items(held, streamed)
    # a cheap fingerprint, stable across builds and different from another size's
    again = data.shapes(size=16, n=40, cache_dir=str(tmp_path), stream=True)
    assert streamed.dataset.fingerprint() == again.dataset.fingerprint()
    other = data.shapes(size=8, n=40, cache_dir=str(tmp_path), stream=True)
    assert other.dataset.fingerprint() != streamed.dataset.fingerprint()


def test_streamed_items_are_decoded_in_loader_workers_and_collate(tmp_path):
    held = data.shapes(size=16, n=24, cache_dir=str(tmp_path))
    streamed = data.shapes(size=16, n=24, cache_dir=str(tmp_path), stream=True)
    order = torch.randperm(24).tolist()
    a = next(iter(torch.utils.data.DataLoader(held.dataset, batch_size=24, sampler=order)))
    b = next(iter(torch.utils.data.DataLoader(streamed.dataset, batch_size=24, sampler=order, num_workers=2)))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"]) and a["caption"] == b["caption"]


def test_streamed_imagefolder_equals_held_and_skips_bad_headers(tmp_path):
    save(tmp_path / "cats" / "a.png", (200, 10, 10))
    save(tmp_path / "cats" / "b.jpg", (10, 200, 10), size=(30, 10))
    save(tmp_path / "dogs" / "c.png", (10, 10, 200))
    (tmp_path / "dogs" / "c.txt").write_text("a blue dog")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        held = data.imagefolder(str(tmp_path), size=8)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        streamed = data.imagefolder(str(tmp_path), size=8, stream=True)
    same_items(held, streamed)
    assert streamed.class_names == ["cats", "dogs"] and streamed.dataset[2]["caption"] == "a blue dog"
    with pytest.raises(DiffxError, match="broken.png"):
        data.imagefolder(str(tmp_path), size=8, stream=True, on_error="raise")


def test_a_file_whose_pixels_do_not_read_stops_streaming_naming_it(tmp_path):
    save(tmp_path / "good.png", (255, 255, 255))
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    whole = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "noise.png").unlink()
    (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])  # the header reads, the pixels do not
    d = data.imagefolder(str(tmp_path), size=8, stream=True)
    with pytest.raises(DiffxError, match="truncated.png") as err:
        d.dataset[1]
    assert "\n" not in str(err.value)


def test_streamed_imagefolder_fingerprint_follows_the_files(tmp_path):
    save(tmp_path / "a.png", (1, 2, 3))
    first = data.imagefolder(str(tmp_path), size=8, stream=True).dataset.fingerprint()
    assert data.imagefolder(str(tmp_path), size=8, stream=True).dataset.fingerprint() == first
    save(tmp_path / "a.png", (1, 2, 3), size=(21, 14))
    assert data.imagefolder(str(tmp_path), size=8, stream=True).dataset.fingerprint() != first


# --- data=hf -------------------------------------------------------------------------------------

def tiny_hf_dataset(n=6, class_label=True):
    images = [Image.fromarray(np.full((12, 10, 3), 30 * i, np.uint8)) for i in range(n)]
    names = ["ant", "bee", "cow"]
    features = datasets.Features({
        "img": datasets.Image(),
        "kind": datasets.ClassLabel(names=names) if class_label else datasets.Value("string"),
        "text": datasets.Value("string"),
    })
    kinds = [i % 3 for i in range(n)] if class_label else [names[2 - i % 3] for i in range(n)]
    return datasets.Dataset.from_dict({"img": images, "kind": kinds, "text": [f"image {i}" for i in range(n)]},
                                      features=features)


HF = {"image_column": "img", "label_column": "kind", "caption_column": "text"}


@pytest.mark.parametrize("stream", [False, True])
def test_hf_save_to_disk_with_class_labels(tmp_path, stream):
    tiny_hf_dataset().save_to_disk(str(tmp_path / "ds"))
    d = data.hf(str(tmp_path / "ds"), size=8, stream=stream, **HF)
    assert (d.num_classes, d.class_names, len(d.dataset)) == (3, ["ant", "bee", "cow"], 6)
    item = d.dataset[4]
    assert item["label"] == 1 and item["caption"] == "image 4" and item["x"].shape == (3, 8, 8)
    assert torch.allclose(item["x"], torch.full((3, 8, 8), 120 / 127.5 - 1))


def test_hf_streamed_equals_held_and_is_memory_mapped(tmp_path):
    tiny_hf_dataset().save_to_disk(str(tmp_path / "ds"))
    held = data.hf(str(tmp_path / "ds"), size=8, **HF)
    streamed = data.hf(str(tmp_path / "ds"), size=8, stream=True, **HF)
    assert image_column_is_memory_mapped(streamed)
    same_items(held, streamed)


def test_hf_dataset_dict_split_and_parquet_folder_with_plain_labels(tmp_path):
    ds = tiny_hf_dataset(class_label=False)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DiffxError, match=r"data.split=None.*\['test', 'train'\]"):
        data.hf(str(tmp_path / "dict"), size=8, **HF)
    d = data.hf(str(tmp_path / "dict"), size=8, split="test", **HF)
    assert len(d.dataset) == 2 and d.class_names == ["bee", "cow"]  # the split's sorted distinct values
    assert [d.dataset[i]["label"] for i in range(2)] == [1, 0]  # "cow", "bee"
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    for stream in (False, True):
        p = data.hf(str(tmp_path / "pq"), size=8, stream=stream, cache_dir=str(tmp_path / "hf_cache"), **HF)
        assert len(p.dataset) == 6 and p.dataset[0]["label"] == 2 and p.dataset[5]["caption"] == "image 5"


def test_hf_without_labels_is_unconditional_and_bad_columns_are_named(tmp_path):
    tiny_hf_dataset().save_to_disk(str(tmp_path / "ds"))
    d = data.hf(str(tmp_path / "ds"), size=8, image_column="img")
    assert d.num_classes == 0 and d.dataset[0]["label"] == -1 and d.dataset[0]["caption"] == ""
    with pytest.raises(DiffxError, match="data.label_column=nope.*'img'"):
        data.hf(str(tmp_path / "ds"), size=8, image_column="img", label_column="nope")
    with pytest.raises(DiffxError, match="neither a save_to_disk folder"):
        data.hf(str(tmp_path), size=8)


# --- exact resume --------------------------------------------------------------------------------

def _train(tmp_path, name, overrides):
    from diffx.train import train

    cfg = compose_config("train", TINY_TRAIN + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / name}",
                                                "data.n=24", "data.stream=true", "train.num_workers=2",
                                                "train.save_every=2", *overrides])
    return train(cfg)


def test_a_resumed_streamed_run_with_workers_equals_a_straight_one(tmp_path):
    """24 images in batches of 8: 3 batches an epoch, so stopping at step 2 and resuming crosses an
    epoch end; 2 loader workers decode the items. The weights match the straight run's bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = _train(tmp_path, "a", ["train.steps=5"])
        _train(tmp_path, "b", ["train.steps=2"])
        resumed = _train(tmp_path, "b", ["train.steps=5"])
    for file in ("model.safetensors", "state/model.safetensors", "state/ema.safetensors"):
        a, b = load_file(str(straight / file)), load_file(str(resumed / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file

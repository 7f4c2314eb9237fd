"""Data builders: the item contract, determinism and caching of shapes, imagefolder's cases."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffx import data
from diffx import shapes as S
from diffx.errors import DiffxError


def small_shapes(tmp_path, **kw):
    return data.shapes(**{"size": 16, "n": 64, "cache_dir": str(tmp_path / "cache"), **kw})


def check_item_contract(d: data.ImageData):
    item = d.dataset[0]
    x = item["x"]
    assert x.dtype == torch.float32 and x.shape == (d.channels, d.image_size, d.image_size)
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert isinstance(item["label"], int) and isinstance(item["caption"], str)
    assert len(d.class_names) == d.num_classes
    labels = torch.tensor([d.dataset[i]["label"] for i in range(len(d.dataset))])
    assert ((labels >= 0) & (labels < d.num_classes)).all() if d.num_classes else (labels == -1).all()


def test_shapes_item_contract_and_labels_match_captions(tmp_path):
    d = small_shapes(tmp_path)
    assert (d.channels, d.image_size, d.num_classes, len(d.dataset)) == (3, 16, 18, 64)
    assert d.class_names[:2] == ["red circle", "green circle"]
    check_item_contract(d)
    for i in range(len(d.dataset)):
        item = d.dataset[i]
        attrs = S.parse_caption(item["caption"])
        assert d.class_names[item["label"]] == f"{attrs['color']} {attrs['shape']}"


def test_shapes_collate_through_a_dataloader(tmp_path):
    d = small_shapes(tmp_path)
    batch = next(iter(torch.utils.data.DataLoader(d.dataset, batch_size=8, shuffle=True)))
    assert batch["x"].shape == (8, 3, 16, 16) and batch["label"].shape == (8,)
    assert batch["label"].dtype == torch.long
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 8


def test_shapes_same_params_give_byte_identical_images_and_seed_changes_them(tmp_path):
    a = data.shapes(size=16, n=32, seed=3, cache_dir=str(tmp_path / "a"))
    b = data.shapes(size=16, n=32, seed=3, cache_dir=str(tmp_path / "b"))
    c = data.shapes(size=16, n=32, seed=4, cache_dir=str(tmp_path / "a"))
    assert torch.equal(a.dataset.images, b.dataset.images) and a.dataset.images.dtype == torch.uint8
    assert a.dataset.captions == b.dataset.captions
    assert not torch.equal(a.dataset.images, c.dataset.images)


def test_shapes_second_call_loads_the_arrow_cache_without_rendering(tmp_path, monkeypatch):
    first = small_shapes(tmp_path)
    [entry] = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert (entry / "dataset_info.json").is_file()

    def no_render(*args, **kwargs):
        raise AssertionError("re-rendered instead of loading the cache")

    monkeypatch.setattr(S, "render", no_render)
    second = small_shapes(tmp_path)
    assert torch.equal(first.dataset.images, second.dataset.images)
    with pytest.raises(AssertionError, match="re-rendered"):
        small_shapes(tmp_path, seed=1)  # other params: another cache entry, so it must render


def test_shapes_configurable_shapes_and_colors(tmp_path):
    d = small_shapes(tmp_path, shapes=["diamond", "square"], colors=["orange", "white", "blue"])
    assert d.num_classes == 6 and d.class_names[0] == "orange diamond"
    with pytest.raises(DiffxError, match="hexagon"):
        small_shapes(tmp_path, shapes=["hexagon"])


# --- imagefolder ------------------------------------------------------------------------------

def save(path: Path, color, size=(40, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_with_class_subfolders(tmp_path):
    save(tmp_path / "dogs" / "a.png", (255, 0, 0))
    save(tmp_path / "cats" / "b.jpg", (0, 0, 255))
    save(tmp_path / "cats" / "nested" / "c.png", (0, 255, 0), size=(10, 30))
    (tmp_path / "cats" / "b.txt").write_text("a blue cat\n")
    (tmp_path / "cats" / "notes.md").write_text("not an image")
    d = data.imagefolder(str(tmp_path), size=8)
    assert (d.num_classes, d.class_names, d.image_size, d.channels) == (2, ["cats", "dogs"], 8, 3)
    check_item_contract(d)
    items = [d.dataset[i] for i in range(len(d.dataset))]
    assert sorted((it["label"], it["caption"]) for it in items) == [(0, ""), (0, "a blue cat"), (1, "")]
    red = next(it for it in items if it["label"] == 1)["x"]
    assert torch.allclose(red[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))  # RGB scaled to [-1, 1]


def test_imagefolder_flat_is_unconditional_and_converts_to_rgb(tmp_path):
    save(tmp_path / "a.png", (10, 20, 30))
    Image.new("L", (16, 16), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (16, 16), (0, 255, 0, 255)).save(tmp_path / "rgba.png")
    d = data.imagefolder(str(tmp_path), size=16)
    assert (d.num_classes, d.class_names, len(d.dataset)) == (0, [], 3)
    check_item_contract(d)
    batch = next(iter(torch.utils.data.DataLoader(d.dataset, batch_size=3)))
    assert batch["x"].shape == (3, 3, 16, 16) and batch["label"].tolist() == [-1, -1, -1]


def test_imagefolder_skips_a_corrupt_file_with_a_counted_warning(tmp_path):
    save(tmp_path / "good.png", (255, 255, 255))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = tmp_path / "good.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable"):
        d = data.imagefolder(str(tmp_path), size=8)
    assert len(d.dataset) == 1


def test_imagefolder_raises_on_a_corrupt_file_naming_it(tmp_path):
    save(tmp_path / "good.png", (255, 255, 255))
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DiffxError, match="broken.jpg"):
        data.imagefolder(str(tmp_path), on_error="raise")


def test_imagefolder_where_nothing_can_be_read_is_an_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DiffxError, match="could be read"):
            data.imagefolder(str(tmp_path))


@pytest.mark.parametrize("make", ["missing", "empty", "file", "only_other_files"])
def test_imagefolder_bad_paths_name_the_path_in_one_line(tmp_path, make):
    path = tmp_path / "images"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    elif make == "only_other_files":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DiffxError) as err:
        data.imagefolder(str(path))
    message = str(err.value)
    assert str(path) in message and "expected" in message and "\n" not in message


def test_imagefolder_rejects_images_both_flat_and_in_subfolders(tmp_path):
    save(tmp_path / "a.png", (0, 0, 0))
    save(tmp_path / "cls" / "b.png", (0, 0, 0))
    with pytest.raises(DiffxError, match="one or the other"):
        data.imagefolder(str(tmp_path))


def test_imagefolder_centre_crops_before_resizing(tmp_path):
    # A wide image whose middle square is white and whose side bands are black.
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    x = data.imagefolder(str(tmp_path), size=10).dataset[0]["x"]
    # Squashing the whole image would make the outer thirds black; only the filter's tail may reach them.
    assert x.mean() > 0.9 and x.min() > 0.5


def test_config_options_instantiate(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    save(tmp_path / "imgs" / "a.png", (1, 2, 3))
    with initialize_config_dir(config_dir=str(conf / "data"), version_base=None):
        shapes_cfg = compose("shapes", overrides=["size=16", "n=8", f"cache_dir={tmp_path / 'cache'}"])
        folder_cfg = compose("imagefolder", overrides=[f"path={tmp_path / 'imgs'}", "size=8"])
    assert instantiate(shapes_cfg).num_classes == 18
    assert instantiate(folder_cfg).num_classes == 0

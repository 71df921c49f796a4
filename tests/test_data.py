"""Tests of robaudit.data on data sets built in tmp_path; nothing is downloaded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robaudit.data import DataSource, iter_batches, load_data, read_class_names, select_indices
from robaudit.errors import ConfigError, DataError, NothingToAudit


def _images(n: int = 6, height: int = 5, width: int = 4, channels: int = 3) -> np.ndarray:
    """Deterministic uint8 NCHW images covering the whole 0-255 range."""
    values = np.arange(n * channels * height * width) * 37 % 256
    return values.reshape(n, channels, height, width).astype(np.uint8)


def _all_batches(source: DataSource, indices: np.ndarray, batch_size: int = 4) -> tuple:
    xs, ys, idxs = zip(*iter_batches(source, indices, batch_size), strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(idxs)


def _write_png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat/ (2 images), dog/ (3, one grayscale), frog/ (1); sizes differ, first is 8x6 (WxH)."""
    root = tmp_path / "images"
    _write_png(root / "cat" / "a.png", (8, 6), 10)
    _write_png(root / "cat" / "b.png", (16, 16), 20)
    _write_png(root / "dog" / "a.png", (8, 6), 30)
    _write_png(root / "dog" / "b.png", (5, 9), 40, mode="L")
    _write_png(root / "dog" / "c.png", (8, 6), 50)
    _write_png(root / "frog" / "a.png", (30, 20), 60)
    return root


# --- tensor files -------------------------------------------------------------------------------


def test_npz_layouts_and_dtypes_give_identical_tensors(tmp_path: Path) -> None:
    x = _images()
    y = np.array([0, 1, 2, 0, 1, 2])
    as_float = x.astype(np.float32) / np.float32(255)
    variants = {
        "u8_nchw": x,
        "u8_nhwc": x.transpose(0, 2, 3, 1),
        "f32_nchw": as_float,
        "f32_nhwc": as_float.transpose(0, 2, 3, 1),
    }
    batches = {}
    for name, images in variants.items():
        np.savez(tmp_path / f"{name}.npz", x=images, y=y)
        source = load_data(tmp_path / f"{name}.npz")
        batches[name] = _all_batches(source, np.arange(6))
    reference = batches["u8_nchw"]
    assert reference[0].dtype == torch.float32
    assert reference[0].shape == (6, 3, 5, 4)
    assert reference[0].min() == 0 and reference[0].max() == 1
    assert torch.equal(reference[0], torch.from_numpy(as_float))
    for x_batch, y_batch, idx in batches.values():
        assert torch.equal(x_batch, reference[0])
        assert y_batch.dtype == torch.int64 and y_batch.tolist() == y.tolist()
        assert idx.dtype == torch.int64 and idx.tolist() == list(range(6))


def test_npz_description_targets_and_default_class_names(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_images(), y=np.array([0, 3, 3, 0, 1, 1], dtype=np.uint8))
    source = load_data(str(tmp_path / "d.npz"))
    assert source.description == str(tmp_path / "d.npz")
    assert source.targets.dtype == np.int64
    assert source.targets.tolist() == [0, 3, 3, 0, 1, 1]
    assert source.class_names == ["0", "1", "2", "3"]
    assert source.num_classes == 4
    x, y = source.dataset[1]
    assert x.shape == (3, 5, 4) and x.dtype == torch.float32 and y == 3


def test_grayscale_without_channel_axis_gets_one(tmp_path: Path) -> None:
    gray = _images(channels=1)[:, 0]
    np.savez(tmp_path / "g.npz", x=gray, y=np.zeros(6, dtype=np.int64))
    x, _, _ = _all_batches(load_data(tmp_path / "g.npz"), np.arange(6))
    assert x.shape == (6, 1, 5, 4)
    assert torch.equal(x[:, 0], torch.from_numpy(gray).float() / 255)


def test_npz_class_names_inside_and_image_size(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "n.npz",
        x=_images(height=8, width=8),
        y=np.array([0, 1, 2, 0, 1, 2]),
        class_names=np.array(["ant", "bee", "cow", "doe"]),
    )
    source = load_data(tmp_path / "n.npz", image_size=4)
    assert source.class_names == ["ant", "bee", "cow", "doe"]
    x, _, _ = _all_batches(source, np.arange(6))
    assert x.shape == (6, 3, 4, 4)
    assert x.min() >= 0 and x.max() <= 1


def test_pt_file_is_read_with_weights_only(tmp_path: Path) -> None:
    x = torch.from_numpy(_images())
    torch.save(
        {"x": x, "y": torch.tensor([2, 1, 0, 2, 1, 0]), "class_names": ["a", "b", "c"]},
        tmp_path / "d.pt",
    )
    source = load_data(tmp_path / "d.pt")
    assert source.class_names == ["a", "b", "c"]
    batch, y, _ = _all_batches(source, np.array([5, 0]))
    assert torch.equal(batch, x[[5, 0]].float() / 255)
    assert y.tolist() == [0, 2]


class _Pickled:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""


def test_pt_file_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    torch.save(
        {"x": torch.zeros(2, 1, 3, 3), "y": torch.tensor([0, 1]), "o": _Pickled()},
        tmp_path / "evil.pt",
    )
    with pytest.raises(DataError, match="weights_only"):
        load_data(tmp_path / "evil.pt")


def test_pt_file_that_is_not_a_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(2, 1, 3, 3), tmp_path / "t.pt")
    with pytest.raises(DataError, match="not a dict"):
        load_data(tmp_path / "t.pt")


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        (
            {"x": np.zeros((0, 3, 4, 4), np.uint8), "y": np.zeros(0, np.int64)},
            "contains no examples",
        ),
        ({"x": np.zeros((2, 1, 3, 4, 4), np.uint8), "y": np.zeros(2, np.int64)}, "N,C,H,W"),
        ({"x": np.zeros((2, 5, 4, 4), np.uint8), "y": np.zeros(2, np.int64)}, "channel axis"),
        (
            {"x": np.zeros((3, 1, 4, 4), np.uint8), "y": np.zeros(2, np.int64)},
            "3 examples but y has 2",
        ),
        (
            {"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.array([0.0, 1.0])},
            "labels must be integers",
        ),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.array([0, -1])}, "labels must be >= 0"),
        ({"x": np.full((2, 1, 4, 4), 255.0), "y": np.array([0, 1])}, r"scale them to \[0, 1\]"),
        ({"x": np.full((2, 1, 4, 4), -0.5), "y": np.array([0, 1])}, "uint8"),
        ({"x": np.full((2, 1, 4, 4), np.nan), "y": np.array([0, 1])}, "NaN"),
        ({"x": np.zeros((2, 1, 4, 4), np.int32), "y": np.array([0, 1])}, "dtype int32"),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.eye(2, dtype=np.int64)}, "one-hot"),
        ({"images": np.zeros((2, 1, 4, 4), np.uint8), "y": np.array([0, 1])}, "needs 'x'"),
        (
            {
                "x": np.zeros((2, 1, 4, 4), np.uint8),
                "y": np.array([0, 1]),
                "class_names": np.array([1, 2]),
            },
            "array of strings",
        ),
    ],
)
def test_invalid_npz_raises_data_error(tmp_path: Path, arrays: dict, words: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=words) as caught:
        load_data(tmp_path / "bad.npz")
    assert "\n" not in str(caught.value)


def test_float_pixels_within_tolerance_are_accepted_and_clipped(tmp_path: Path) -> None:
    x = np.full((2, 1, 2, 2), 1 + 5e-7, dtype=np.float64)
    x[1] = -5e-7
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 1]))
    batch, _, _ = _all_batches(load_data(tmp_path / "f.npz"), np.arange(2))
    assert batch[0].eq(1).all() and batch[1].eq(0).all()


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "o.npz",
        x=np.zeros((2, 1, 4, 4), np.uint8),
        y=np.array([0, 1]),
        class_names=np.array(["a", None], dtype=object),
    )
    with pytest.raises(DataError, match="does not unpickle"):
        load_data(tmp_path / "o.npz")


def test_corrupt_npz_raises_data_error(tmp_path: Path) -> None:
    (tmp_path / "c.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"not an \.npz"):
        load_data(tmp_path / "c.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "a.npz")
    with pytest.raises(DataError, match=r"not an \.npz"):
        load_data(tmp_path / "a.npz")


# --- class names ----------------------------------------------------------------------------------


def test_class_names_file_replaces_names_and_ignores_blank_lines(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_images(), y=np.array([0, 1, 2, 0, 1, 2]))
    names_file = tmp_path / "names.txt"
    names_file.write_text("plane\n\n  car \nbird\n\n")
    assert read_class_names(names_file) == ["plane", "car", "bird"]
    source = load_data(tmp_path / "d.npz", class_names_file=names_file)
    assert source.class_names == ["plane", "car", "bird"]


def test_labels_beyond_class_names_file_name_max_label_and_count(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_images(), y=np.array([0, 1, 4, 0, 1, 2]))
    names_file = tmp_path / "names.txt"
    names_file.write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"labels .* go up to 4 but .* has only 3 class names"):
        load_data(tmp_path / "d.npz", class_names_file=names_file)


def test_labels_beyond_npz_class_names(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz",
        x=_images(),
        y=np.array([0, 1, 2, 0, 1, 2]),
        class_names=np.array(["a", "b"]),
    )
    with pytest.raises(DataError, match=r"go up to 2 but .* only 2 class names"):
        load_data(tmp_path / "d.npz")


def test_class_names_file_count_must_match_folder(folder: Path, tmp_path: Path) -> None:
    names_file = tmp_path / "names.txt"
    names_file.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"has 2 names but .* has 3 classes"):
        load_data(folder, class_names_file=names_file)
    names_file.write_text("Cat\nDog\nFrog\n")
    assert load_data(folder, class_names_file=names_file).class_names == ["Cat", "Dog", "Frog"]


@pytest.mark.parametrize(
    ("content", "words"), [("\n\n", "has no names"), ("a\nb\na\n", "names 'a' twice")]
)
def test_bad_class_names_file(tmp_path: Path, content: str, words: str) -> None:
    (tmp_path / "names.txt").write_text(content)
    with pytest.raises(DataError, match=words):
        read_class_names(tmp_path / "names.txt")


def test_missing_class_names_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read class names file"):
        read_class_names(tmp_path / "absent.txt")


# --- image folders --------------------------------------------------------------------------------


def test_image_folder_names_sizes_and_channels(folder: Path) -> None:
    source = load_data(folder)
    assert source.class_names == ["cat", "dog", "frog"]
    assert source.targets.tolist() == [0, 0, 1, 1, 1, 2]
    assert source.description == str(folder)
    x, y, idx = _all_batches(source, np.arange(6), batch_size=4)
    # Every image is resized and centre-cropped to the first image's size (8 wide, 6 high).
    assert x.shape == (6, 3, 6, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1, 1, 2] and idx.tolist() == list(range(6))
    # The first image is used as it is: a uniform colour (10, 245, 7).
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([10, 245, 7]) / 255)
    # The grayscale image came back as three equal channels.
    assert torch.equal(x[3, 0], x[3, 1]) and torch.equal(x[3, 1], x[3, 2])
    assert torch.allclose(x[3], torch.full((3, 6, 8), 40 / 255))


def test_image_folder_with_image_size(folder: Path) -> None:
    source = load_data(folder, image_size=7)
    x, _, _ = _all_batches(source, np.array([5, 1]), batch_size=2)
    assert x.shape == (2, 3, 7, 7)
    assert torch.allclose(x[0, :, 3, 3], torch.tensor([60, 195, 7]) / 255, atol=1 / 255)


def test_image_folder_loads_images_lazily(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    source = load_data(folder)
    assert opened == [str(folder / "cat" / "a.png")]  # only the first image's header, for its size
    assert all(isinstance(path, str) for path, _ in source.dataset.samples)
    # Removing images that are not selected does not matter: nothing was decoded up front.
    (folder / "dog" / "c.png").unlink()
    list(iter_batches(source, np.array([0, 5]), batch_size=2))
    assert opened[1:] == [str(folder / "cat" / "a.png"), str(folder / "frog" / "a.png")]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_names_the_file(folder: Path, num_workers: int) -> None:
    broken = folder / "dog" / "b.png"
    broken.write_bytes(b"\x89PNG not really")
    source = load_data(folder)
    with pytest.raises(DataError, match=r"cannot read image .*b\.png") as caught:
        list(iter_batches(source, np.arange(6), batch_size=2, num_workers=num_workers))
    assert str(broken) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_empty_class_folder_keeps_its_label(folder: Path) -> None:
    (folder / "bee").mkdir()
    source = load_data(folder)
    assert source.class_names == ["bee", "cat", "dog", "frog"]
    assert Counter(source.targets.tolist()) == {1: 2, 2: 3, 3: 1}


def test_folder_without_class_folders_or_images(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    _write_png(tmp_path / "flat" / "a.png", (4, 4), 0)
    with pytest.raises(DataError, match="no class folders"):
        load_data(tmp_path / "flat")
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    (tmp_path / "hollow" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="contains no examples"):
        load_data(tmp_path / "hollow")


# --- names, paths and torchvision -----------------------------------------------------------------


def test_unknown_name_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="did you mean cifar10") as caught:
        load_data("cifar1O", root=tmp_path)
    assert ".npz" in str(caught.value) and "folder" in str(caught.value)


def test_missing_path_lists_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data set, folder or file") as caught:
        load_data(str(tmp_path / "absent.npz"))
    assert "did you mean" not in str(caught.value)
    assert "mnist" in str(caught.value) and ".npz/.pt" in str(caught.value)


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"\.csv file; --data takes"):
        load_data(tmp_path / "data.csv")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: zero, dtype code 8 (uint8), rank, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_read_from_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([7, 0, 7, 2]))
    source = load_data("MNIST", root=tmp_path, image_size=14)
    assert source.description == f"mnist (test) at {tmp_path}"
    assert source.targets.tolist() == [7, 0, 7, 2] and source.targets.dtype == np.int64
    assert source.class_names[7] == "7 - seven" and source.num_classes == 10
    x, y, _ = _all_batches(source, np.array([1, 3]), batch_size=2)
    assert x.shape == (2, 1, 14, 14) and y.tolist() == [0, 2]
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join("abcdefghi"))
    with pytest.raises(DataError, match=r"has 9 names but mnist .* has 10 classes"):
        load_data("mnist", root=tmp_path, class_names_file=names_file)


def test_name_wins_over_a_folder_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(DataError, match=r"write \./cifar10"):
        load_data("cifar10")


@pytest.mark.parametrize("name", ["cifar10", "MNIST", "imagenet", "Fashion-MNIST"])
def test_torchvision_name_needs_root(name: str) -> None:
    with pytest.raises(DataError, match="--data-root"):
        load_data(name)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "svhn", "stl10"])
def test_torchvision_data_missing_on_disk_suggests_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--download") as caught:
        load_data(name, root=tmp_path)
    assert f"{name} (test) at {tmp_path}" in str(caught.value)
    assert not any(tmp_path.iterdir())  # nothing was fetched


def test_imagenet_missing_on_disk_says_what_to_put_there(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ILSVRC2012_devkit_t12.tar\.gz") as caught:
        load_data("imagenet", root=tmp_path)
    assert "imagenet (val)" in str(caught.value)
    with pytest.raises(DataError, match="cannot be downloaded automatically"):
        load_data("imagenet", root=tmp_path, download=True)


def test_torchvision_root_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        load_data("cifar10", root=tmp_path / "absent")


def test_torchvision_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no split 'val'; choose one of train, test"):
        load_data("cifar10", root=tmp_path, split="val")


def test_nonpositive_image_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image size"):
        load_data(tmp_path, image_size=0)


# --- sampling -------------------------------------------------------------------------------------

TARGETS = np.repeat([0, 1, 2, 3], [10, 5, 3, 8])  # 26 examples, unbalanced


def _class_counts(indices: np.ndarray) -> list[int]:
    return np.bincount(TARGETS[indices], minlength=4).tolist()


def test_per_class_takes_exact_counts() -> None:
    chosen = select_indices(TARGETS, per_class=4, seed=0)
    assert _class_counts(chosen) == [4, 4, 3, 4]
    assert chosen.dtype == np.int64
    assert np.all(np.diff(chosen) > 0)  # sorted, no repeats
    assert _class_counts(select_indices(TARGETS, per_class=100)) == [10, 5, 3, 8]


def test_same_seed_same_indices_other_seed_other_indices() -> None:
    first = select_indices(TARGETS, per_class=3, seed=7)
    assert np.array_equal(first, select_indices(TARGETS, per_class=3, seed=7))
    assert not np.array_equal(first, select_indices(TARGETS, per_class=3, seed=8))
    assert not np.array_equal(
        select_indices(TARGETS, limit=8, seed=7), select_indices(TARGETS, limit=8, seed=8)
    )


def test_limit_alone_is_a_balanced_subset() -> None:
    for seed in range(5):
        chosen = select_indices(TARGETS, limit=10, seed=seed)
        counts = _class_counts(chosen)
        assert sum(counts) == 10
        # 10 over 4 classes: two classes get 3 and two get 2; class 2 has only 3 examples.
        assert sorted(counts) == [2, 2, 3, 3]
    # When a class runs out, the others fill the remaining places in turn.
    assert _class_counts(select_indices(TARGETS, limit=20)) == [6, 5, 3, 6]


def test_limit_after_per_class_keeps_balance_and_nests() -> None:
    capped = select_indices(TARGETS, per_class=4, limit=6, seed=3)
    assert sorted(_class_counts(capped)) == [1, 1, 2, 2]
    # With one seed, a smaller selection is part of a larger one.
    assert set(capped) <= set(select_indices(TARGETS, per_class=4, seed=3))
    assert set(select_indices(TARGETS, per_class=1, seed=3)) <= set(capped)


def test_no_per_class_no_limit_selects_everything() -> None:
    assert np.array_equal(select_indices(TARGETS), np.arange(26))


def test_empty_selection_raises_nothing_to_audit() -> None:
    with pytest.raises(NothingToAudit, match="nothing to audit: the data set has no examples"):
        select_indices(np.zeros(0, dtype=np.int64))
    with pytest.raises(NothingToAudit, match="--per-class 0"):
        select_indices(TARGETS, per_class=0)
    with pytest.raises(NothingToAudit, match="--limit 0"):
        select_indices(TARGETS, limit=0)


def test_negative_counts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--per-class must be 0 or more"):
        select_indices(TARGETS, per_class=-1)


# --- batching -------------------------------------------------------------------------------------


def test_iter_batches_follows_the_order_of_indices(tmp_path: Path) -> None:
    x = _images(n=7)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 3, 4, 5, 6]))
    source = load_data(tmp_path / "d.npz")
    order = np.array([6, 2, 4, 0, 5])
    batches = list(iter_batches(source, order, 2))
    assert [len(y) for _, y, _ in batches] == [2, 2, 1]
    xs, ys, idxs = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert idxs.tolist() == ys.tolist() == order.tolist()
    assert torch.equal(xs, torch.from_numpy(x[order]).float() / 255)


def test_iter_batches_over_a_folder_matches_items(folder: Path) -> None:
    source = load_data(folder)
    order = np.array([4, 1, 5])
    x, y, idx = _all_batches(source, order, batch_size=2)
    assert idx.tolist() == [4, 1, 5] and y.tolist() == source.targets[order].tolist()
    for row, i in enumerate(order):
        assert torch.equal(x[row], source.dataset[int(i)][0])


def test_iter_batches_rejects_bad_arguments(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_images(), y=np.zeros(6, dtype=np.int64))
    source = load_data(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match="batch size"):
        list(iter_batches(source, np.arange(6), 0))
    with pytest.raises(ValueError, match="indices must lie in"):
        list(iter_batches(source, np.array([6]), 2))

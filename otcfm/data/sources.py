"""Training data from whatever a user has: a dataset name, a tensor or array, a file, a Dataset, a sampler.

:func:`as_source` turns each of these into a :class:`DataSource`, one interface for the training engine::

    source(n, generator) -> (n, *shape) float32 tensor on the CPU

- a name in :data:`otcfm.data.DATASETS`, with its keyword options (``"mixture"`` with ``dim=32``);
  ``"gaussian"`` without ``dim`` takes the sample shape of the other side (``like=``), images included;
- a folder of PNG images (:func:`otcfm.data.images.load_image_folder`: ``(N, C, H, W)`` scaled to [-1, 1]);
- a tensor or numpy array ``(N, ...)``, a ``.npy`` file (read without pickle) or a ``.pt`` file holding one
  tensor (read with ``weights_only=True``): rows drawn uniformly with replacement;
- a map-style ``torch.utils.data.Dataset`` whose items are tensors or tuples whose first entry is one
  (``(x, label)``): items drawn uniformly with replacement;
- a sampler function ``f(n, generator) -> (n, ...)``;
- a pair ``(data, labels)`` of a tensor or array and its integer class labels ``(N,)``.

Labels: a source built from labelled data keeps them (:attr:`DataSource.labels`, drawn beside the samples by
:meth:`DataSource.labeled`): the labels of a ``(data, labels)`` pair or of ``labels=``, the second tensor of a
``TensorDataset``, the labels of ``"digits"``, ``"mnist"`` and ``"cifar10"``, or the second entry of a
``Dataset``'s items. Drawing samples alone draws the same rows from the generator as drawing them with labels.

Finite datasets are converted to float32 once (integer pixels included) and checked for NaN/Inf once, when
the source is made; sample shapes are kept (``(N, C, H, W)`` images stay images). Every draw comes from the
caller's CPU ``torch.Generator``, so a training run that saves the generator resumes bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from otcfm._hashing import content_hash
from otcfm.checkpoint import load_failure

__all__ = ["FILE_SUFFIXES", "DataLike", "DataSource", "as_source", "content_hash"]

#: File types :func:`as_source` reads.
FILE_SUFFIXES = (".npy", ".pt", ".pth")

#: Anything :func:`as_source` accepts.
DataLike = str | os.PathLike | Tensor | np.ndarray | Dataset | Callable[[int, torch.Generator], Tensor]


class DataSource:
    """A distribution to draw training samples from.

    Attributes:
        shape: the shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        spec: what a run's config records: the dataset name, the file path, or a description such as
            ``"tensor(1000, 5)"`` / ``"callable:mod.fn"`` for objects that cannot be named.
        fingerprint: identifies the content (SHA-256 of a tensor's or file's values, first 16 hex digits; of
            16 items of a Dataset or 16 draws of a sampler, see :func:`_sampled`; a name and its options); a
            resumed run checks it.
        rows: the whole dataset ``(N, *shape)`` when the data are a finite table drawn uniformly (a tensor, an
            array, a file, a ``TensorDataset``, ``"digits"``), else None; the semidiscrete coupler pairs with it.
        labels: ``(N,)`` int64 class labels of ``rows`` when the data carry them, else None (a ``Dataset``'s
            labels are read by :meth:`labeled` as it draws; :attr:`num_classes` reads them all).
    """

    def __init__(
        self,
        draw: Callable[[int, torch.Generator | None], Tensor],
        shape: tuple[int, ...],
        spec: str,
        fingerprint: str,
        rows: Tensor | None = None,
        labels: Tensor | None = None,
        draw_labeled: Callable[[int, torch.Generator | None], tuple[Tensor, Tensor]] | None = None,
        all_labels: Callable[[], Tensor] | None = None,
    ) -> None:
        self._draw, self.shape, self.spec, self.fingerprint = draw, shape, spec, fingerprint
        self.rows, self.labels = rows, labels
        if labels is not None and rows is not None and draw_labeled is None:

            def draw_rows_labeled(n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
                index = torch.randint(rows.shape[0], (n,), generator=generator)  # the draw of _from_tensor
                return rows[index], labels[index]

            draw_labeled = draw_rows_labeled
        self._draw_labeled = draw_labeled
        self._read_labels = (lambda: labels) if labels is not None else all_labels
        self._all: Tensor | None = None

    @property
    def has_labels(self) -> bool:
        """Whether the data carry class labels (:meth:`labeled` can draw them)."""
        return self._draw_labeled is not None

    def all_labels(self) -> Tensor:
        """Every row's label, ``(N,)`` int64 (a ``Dataset``'s are read once, on the first call).

        Raises:
            ValueError: the data carry no class labels.
        """
        if self._read_labels is None:
            raise ValueError(f"{self.spec}: the data carry no class labels")
        if self._all is None:
            self._all = self._read_labels()
        return self._all

    @property
    def num_classes(self) -> int:
        """``1 + `` the largest label (classes are ``0 .. num_classes - 1``)."""
        return int(self.all_labels().max()) + 1

    @property
    def labels_fingerprint(self) -> str | None:
        """SHA-256 of all the labels (first 16 hex digits), None without labels."""
        return None if self._read_labels is None else content_hash(self.all_labels())

    def labeled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, *shape)`` and their labels ``(n,)`` int64, drawn as :meth:`__call__` draws samples."""
        if self._draw_labeled is None:
            raise ValueError(
                f"{self.spec}: the data carry no class labels; give them as (data, labels), target_labels=, or a "
                "Dataset of (x, label) items"
            )
        return self._draw_labeled(n, generator)

    @property
    def features(self) -> int:
        """Number of values in one sample (``prod(shape)``)."""
        return math.prod(self.shape)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, ``(n, *shape)``, float32 on the CPU."""
        return self._draw(n, generator)

    def __repr__(self) -> str:
        return f"DataSource({self.spec!r}, shape={self.shape})"


def as_source(
    data: DataLike | tuple[Tensor | np.ndarray, Tensor | np.ndarray],
    argument: str = "data",
    options: dict[str, Any] | None = None,
    like: DataSource | None = None,
    labels: Tensor | np.ndarray | None = None,
) -> DataSource:
    """Wrap ``data`` as a :class:`DataSource` (see the module docstring for what is accepted).

    Args:
        data: a dataset name, a path to a ``.npy`` / ``.pt`` file, a tensor or array ``(N, ...)``, a
            ``Dataset``, or a sampler ``f(n, generator) -> (n, ...)``.
        argument: the caller's name for ``data`` (``"target"``, ``"--target"``), used in error messages.
        options: keyword options of a named dataset (``{"dim": 32}``); only for names.
        like: the other side of the problem; ``"gaussian"`` without ``dim`` then draws samples of its shape.
        labels: integer class labels ``(N,)`` (or ``(N, 1)``) of a tensor, array or file, one per row.

    Returns:
        the :class:`DataSource`.

    Raises:
        ValueError: unknown name, empty data, 1-D data, NaN/Inf, options for data that is not a name.
        TypeError: an unsupported type or dtype, or a sampler returning something else than ``(n, ...)``.
        FileNotFoundError: a file path that does not exist.
    """
    options = dict(options or {})
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (Tensor, np.ndarray)):
        if labels is not None:
            raise ValueError(f"{argument}: labels given twice, in the ({argument}, labels) pair and as labels")
        data, labels = data
    source = _unlabeled_source(data, argument, options, like)
    if labels is None:
        return source
    if source.rows is None:
        raise ValueError(
            f"{argument}_labels: labels go with a finite table (a tensor, array or file), not {source.spec}"
        )
    checked = check_class_labels(labels, source.rows.shape[0], f"{argument}_labels")
    return DataSource(source._draw, source.shape, source.spec, source.fingerprint, rows=source.rows, labels=checked)


def check_class_labels(labels: Any, rows: int, argument: str) -> Tensor:
    """Integer class labels ``(rows,)`` (``(rows, 1)`` accepted), ``>= 0``, as int64 on the CPU."""
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{argument}: expected integer class labels, got dtype {labels.dtype}")
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    if not isinstance(labels, Tensor):
        raise TypeError(f"{argument}: expected a tensor or array of integer class labels, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{argument}: expected integer class labels, got dtype {labels.dtype}")
    if labels.shape not in ((rows,), (rows, 1)):
        raise ValueError(f"{argument}: expected one label per row, shape ({rows},), got {tuple(labels.shape)}")
    labels = labels.detach().to(device="cpu", dtype=torch.int64).reshape(rows)
    if rows and int(labels.min()) < 0:
        raise ValueError(f"{argument}: expected class labels >= 0, got {int(labels.min())}")
    return labels


def _unlabeled_source(data: Any, argument: str, options: dict[str, Any], like: DataSource | None) -> DataSource:
    if isinstance(data, (str, os.PathLike)) and str(data) and Path(data).is_dir():
        _no_options(options, argument)
        from otcfm.data.images import load_image_folder

        return _from_tensor(load_image_folder(data), argument, os.path.abspath(data))
    if isinstance(data, os.PathLike) or (isinstance(data, str) and _looks_like_file(data)):
        _no_options(options, argument)
        return _from_file(Path(data), argument)
    if isinstance(data, str):
        return _from_name(data, argument, options, like)
    _no_options(options, argument)
    if isinstance(data, (Tensor, np.ndarray)):
        return _from_tensor(_as_float_tensor(data, argument), argument, f"tensor{tuple(data.shape)}")
    if isinstance(data, TensorDataset):
        source = _from_tensor(
            _as_float_tensor(data.tensors[0], argument), argument, f"dataset:TensorDataset[{len(data)}]"
        )
        second = data.tensors[1] if len(data.tensors) > 1 else None
        if second is None or second.is_floating_point() or second.shape not in ((len(data),), (len(data), 1)):
            return source
        labels = check_class_labels(second, len(data), f"{argument} (the TensorDataset's labels)")
        return DataSource(source._draw, source.shape, source.spec, source.fingerprint, rows=source.rows, labels=labels)
    if isinstance(data, Dataset):
        return _from_dataset(data, argument)
    if callable(data):
        return _from_sampler(data, argument)
    raise TypeError(
        f"{argument}: expected a dataset name, a .npy/.pt file, a tensor or array (N, ...), a Dataset or a "
        f"sampler f(n, generator), got {type(data).__name__}"
    )


def _looks_like_file(text: str) -> bool:
    return text.endswith(FILE_SUFFIXES) or os.sep in text


def _no_options(options: dict[str, Any], argument: str) -> None:
    if options:
        raise ValueError(f"{argument}: options {sorted(options)} apply to a dataset name only")


#: How many items of a Dataset, or draws of a sampler, its fingerprint hashes (read twice, see :func:`_sampled`).
_PROBE = 16
_SAMPLED = ":sampled="


def _sampled(spec: str, read: Callable[[], Tensor]) -> str:
    """A fingerprint of data known by a name only (a Dataset, a sampler): the name and a hash of what ``read``
    gives, so that a resumed run finds other content refused. Data that come out otherwise the second time
    (random augmentation, a sampler that draws from torch's global generator) keep the name alone."""
    first, second = content_hash(read()), content_hash(read())
    return f"{spec}{_SAMPLED}{first}" if first == second else spec


def _from_name(name: str, argument: str, options: dict[str, Any], like: DataSource | None) -> DataSource:
    from otcfm.data import DATASETS, sample

    if name not in DATASETS:
        valid = ", ".join(repr(c) for c in sorted(DATASETS))
        raise ValueError(
            f"{argument}: unknown dataset {name!r}; expected one of {valid}, or a path to a "
            f"{'/'.join(FILE_SUFFIXES)} file"
        )
    fingerprint = f"{name}:{json.dumps(options, sort_keys=True)}"
    if name == "gaussian" and "dim" not in options and like is not None and like.shape != (2,):
        shape = like.shape

        def draw_like(n: int, generator: torch.Generator | None) -> Tensor:
            return sample("gaussian", n, generator, dim=math.prod(shape)).reshape(n, *shape)

        return DataSource(draw_like, shape, name, f"{fingerprint}:shape={shape}")

    def draw_named(n: int, generator: torch.Generator | None) -> Tensor:
        return sample(name, n, generator, **options)

    try:
        probe = draw_named(1, torch.Generator().manual_seed(0))
    except TypeError as error:  # an option the sampler does not take
        raise ValueError(f"{argument}: invalid options {options} for dataset {name!r} ({error})") from error
    from otcfm.data import TABLES

    rows = labels = None
    if name in TABLES:  # a finite table (a split of it), drawn uniformly: its sampler draws the same rows
        rows, labels = TABLES[name](**options)
    return DataSource(draw_named, tuple(probe.shape[1:]), name, fingerprint, rows=rows, labels=labels)


def _from_file(path: Path, argument: str) -> DataSource:
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"{argument}: cannot read {str(path)!r}; expected a {'/'.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no file at {str(path)!r}")
    try:
        if path.suffix == ".npy":
            raw: Any = np.load(path, allow_pickle=False)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign file: one clear message naming it
        raise ValueError(
            f"{argument}: {str(path)!r} is not a readable {path.suffix} array ({load_failure(error)}); a .pt file "
            "holds one tensor (torch.save(tensor, path)), a .npy file one array (np.save)"
        ) from error
    if not isinstance(raw, (Tensor, np.ndarray)):
        raise TypeError(f"{argument}: {str(path)!r} holds a {type(raw).__name__}; expected one tensor (N, ...)")
    tensor = _as_float_tensor(raw, f"{argument} ({path})")
    # recorded as an absolute path: a run's checkpoint then finds its data from any working directory
    return _from_tensor(tensor, f"{argument} ({path})", os.path.abspath(path))


def _as_float_tensor(data: Tensor | np.ndarray, argument: str) -> Tensor:
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "fiu":
            raise TypeError(f"{argument}: expected a numeric array, got dtype {data.dtype}")
        data = torch.from_numpy(np.ascontiguousarray(data))
    if data.dtype == torch.bool or data.is_complex():
        raise TypeError(f"{argument}: expected real numbers, got dtype {data.dtype}")
    if data.is_meta:
        raise ValueError(f"{argument}: a meta tensor has a shape but no values; expected data on 'cpu' or 'cuda'")
    return data.detach().to(device="cpu", dtype=torch.float32)


def _from_tensor(data: Tensor, argument: str, spec: str) -> DataSource:
    if data.ndim < 2:
        raise ValueError(
            f"{argument}: expected shape (N, ...) with one row per sample, got {tuple(data.shape)}; "
            "reshape 1-D data to (N, 1)"
        )
    if data.shape[0] == 0:
        raise ValueError(f"{argument}: expected at least one sample, got shape {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{argument}: contains NaN or Inf")

    def draw_rows(n: int, generator: torch.Generator | None) -> Tensor:
        return data[torch.randint(data.shape[0], (n,), generator=generator)]

    return DataSource(draw_rows, tuple(data.shape[1:]), spec, content_hash(data), rows=data)


def _first_tensor(item: Any, argument: str) -> Tensor:
    value = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(value, (Tensor, np.ndarray)):
        raise TypeError(f"{argument}: dataset items must be tensors or (tensor, ...) tuples, got {type(item).__name__}")
    return _as_float_tensor(value, argument)


def _from_dataset(dataset: Dataset, argument: str) -> DataSource:
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as error:
        raise TypeError(
            f"{argument}: expected a map-style Dataset with __len__, got {type(dataset).__name__}"
        ) from error
    if size == 0:
        raise ValueError(f"{argument}: the dataset is empty")
    first = _first_tensor(dataset[0], argument)
    shape = tuple(first.shape)
    if not bool(torch.isfinite(first).all()):
        raise ValueError(f"{argument}: dataset item 0 contains NaN or Inf")
    if not shape:
        raise ValueError(f"{argument}: dataset items are scalars; expected samples of shape (d,) or (C, H, W), ...")

    def items(index: list[int]) -> Tensor:
        batch = [_first_tensor(dataset[k], argument) for k in index]
        other = next((tuple(x.shape) for x in batch if x.shape != shape), None)
        if other is not None:
            raise ValueError(f"{argument}: dataset items of different shapes, {shape} and {other}")
        return torch.stack(batch)

    def draw_items(n: int, generator: torch.Generator | None) -> Tensor:
        return items(torch.randint(size, (n,), generator=generator).tolist())

    def label_of(k: int) -> int:
        item = dataset[k]
        value = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else None
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = value.item()
        elif (
            isinstance(value, (np.ndarray, np.integer)) and np.size(value) == 1 and np.asarray(value).dtype.kind in "iu"
        ):
            value = np.asarray(value).item()
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{argument}: item {k} has no integer class label >= 0 as its second entry, got {value!r}")
        return int(value)

    def draw_labeled(n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        index = torch.randint(size, (n,), generator=generator).tolist()
        return items(index), torch.tensor([label_of(k) for k in index], dtype=torch.int64)

    def all_labels() -> Tensor:
        targets = getattr(dataset, "targets", None)  # torchvision's datasets hold them
        if isinstance(targets, (Tensor, np.ndarray, list)) and len(targets) == size:
            return check_class_labels(torch.as_tensor(np.asarray(targets)), size, f"{argument} (its targets)")
        return torch.tensor([label_of(k) for k in range(size)], dtype=torch.int64)

    first_item = dataset[0]
    labelled = isinstance(first_item, (tuple, list)) and len(first_item) > 1
    spec = f"dataset:{type(dataset).__qualname__}[{size}]"
    spread = sorted({k * (size - 1) // max(_PROBE - 1, 1) for k in range(_PROBE)})  # first to last, evenly
    return DataSource(
        draw_items,
        shape,
        spec,
        _sampled(spec, lambda: items(spread)),
        draw_labeled=draw_labeled if labelled else None,
        all_labels=all_labels if labelled else None,
    )


def _from_sampler(sampler: Callable[[int, torch.Generator], Tensor], argument: str) -> DataSource:
    name = f"callable:{getattr(sampler, '__module__', '?')}.{getattr(sampler, '__qualname__', type(sampler).__name__)}"

    def checked(n: int, generator: torch.Generator | None) -> Tensor:
        x = sampler(n, generator)
        if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] != n:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{argument}: the sampler must return a tensor of shape ({n}, ...), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"{argument}: the sampler must return floating-point samples, got {x.dtype}")
        return x.to(torch.float32)

    try:
        probe = checked(2, torch.Generator().manual_seed(0))  # its own generator: the run's stream is untouched
    except TypeError as error:
        if str(error).startswith(f"{argument}:"):
            raise
        raise TypeError(f"{argument}: the sampler raised TypeError when called as f(n, generator) ({error})") from error
    if not bool(torch.isfinite(probe).all()):
        raise ValueError(f"{argument}: the sampler returned NaN or Inf (in a probe draw of 2 samples)")
    fingerprint = _sampled(name, lambda: checked(_PROBE, torch.Generator().manual_seed(0)))
    return DataSource(checked, tuple(probe.shape[1:]), name, fingerprint)

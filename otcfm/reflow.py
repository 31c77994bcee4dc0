"""Reflow: (noise, sample) pairs from a trained flow, k-rectified training, one-step distillation.

Liu et al. (2022): a flow trained on the pairs ``(x0, T(x0))`` that a trained flow ``T`` produces is
straighter than ``T`` (2-rectified flow), and a straight flow can be distilled into a one-step generator
``x1 = x0 + v(x0, 0)``.

Pair files: a directory with ``meta.json`` (teacher fingerprint, source, solver, steps, seed, sizes, and the
set's identity: a hash of those settings) and chunks ``chunk-00000.pt`` written atomically, each recording the
set's identity and its own index, so that :func:`load_pairs` refuses a chunk copied from another pair set (or
from another position in this one) even where its size fits. Chunk ``k`` draws its noise from a generator
seeded with ``(seed * 1_000_003 + k) mod 2**64``, so an interrupted generation resumes with the chunks it
lacks and produces the same pairs as an uninterrupted one. Under torchrun the chunks are sharded over ranks
(rank ``r`` of ``W`` makes chunks ``r, r + W, ...``): the pair set is the same file for file as a one-process
generation, and ``train_on_pairs`` / ``distill`` train with DDP (each rank drawing its own batch).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from otcfm import checkpoint as ckpt
from otcfm import distributed
from otcfm._args import check_count, check_flag, check_seed
from otcfm._checks import all_finite, check_choice, check_dtype_fits, floating_dtype, host_reads_free
from otcfm._describe import describe
from otcfm._random import keeps_global_rng
from otcfm.batches import FixedPairs
from otcfm.data import Sampler
from otcfm.data.sources import DataSource, as_source, check_class_labels, content_hash
from otcfm.engine import LRSchedule, Precision, Schedule, fit, resolve_device, schedule_from
from otcfm.flow import FlowMatcher
from otcfm.rundir import RunDirectory
from otcfm.solvers import METHODS, Method, check_output, check_velocity, integrate
from otcfm.timesteps import TimeSampler

__all__ = [
    "OnlinePairs",
    "PairSet",
    "RunOptions",
    "distill",
    "generate_pairs",
    "load_pairs",
    "rectify",
    "teacher_fingerprint",
    "train_on_pairs",
]

PAIR_FORMAT = 1
PairSource = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class PairSet:
    """Noise-sample pairs ``(x0[k], x1[k])`` pushed through a teacher flow.

    Attributes:
        x0: ``(n, ...)`` source samples.
        x1: ``(n, ...)`` the teacher's images of ``x0``.
        meta: how they were made (teacher fingerprint, solver, steps, seed, source).
        y: ``(n,)`` int64 class labels the pairs were made with (a class-conditional teacher), or None.

    Raises:
        TypeError, ValueError: ``x0`` or ``x1`` is no floating tensor ``(n, ...)``, or they differ in shape or dtype;
            ``y`` is no integer tensor ``(n,)``.
    """

    x0: Tensor
    x1: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    y: Tensor | None = None

    def __post_init__(self) -> None:
        _check_pair_tensors(self.x0, self.x1, "x0", "x1")
        if self.y is not None:
            object.__setattr__(self, "y", check_class_labels(self.y, self.x0.shape[0], "y"))

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __call__(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` pairs drawn uniformly with replacement, the pairing kept: ``((n, ...), (n, ...))``."""
        k = torch.randint(len(self), (n,), generator=generator)
        return self.x0[k], self.x1[k]

    def labeled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` pairs and their labels, drawn as :meth:`__call__` draws pairs: ``((n, ...), (n, ...), (n,))``."""
        if self.y is None:
            raise ValueError("pairs: this pair set holds no class labels")
        k = torch.randint(len(self), (n,), generator=generator)
        return self.x0[k], self.x1[k], self.y[k]


def _check_pair_tensors(x0: Any, x1: Any, first: str, second: str, rows: int | None = None) -> None:
    """``x0`` and ``x1`` must be floating tensors of one shape ``(n, ...)`` and one dtype (``rows``: ``n``), or
    raise naming them as the caller knows them (``first``, ``second``: ``"x0"``, or ``"pairs: x0"``)."""
    for name, x in ((first, x0), (second, x1)):
        if not isinstance(x, Tensor) or x.ndim < 2:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name}: expected a tensor of shape (n, ...), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    together = f"{first} and {second.split(': ')[-1]}"
    if x0.shape != x1.shape:
        raise ValueError(f"{together}: expected pairs of the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if rows is not None and x0.shape[0] != rows:
        raise ValueError(f"{together}: asked for {rows} pairs, got {x0.shape[0]} (shape {tuple(x0.shape)})")
    if x0.dtype != x1.dtype:
        raise ValueError(f"{together}: expected pairs of the same dtype, got {x0.dtype} and {x1.dtype}")


def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a model's state dict: names, shapes, dtypes and values.

    0-d tensors (BatchNorm's ``num_batches_tracked``) are hashed like the others: their name, shape ``()``, dtype
    and the bytes of their value.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (BatchNorm uses its running statistics and leaves them alone, Dropout is off), each
    submodule put back in its own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for module, _ in modes:
            module.training = False
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _chunk_noise(
    source: DataSource, seed: int, chunk: int, size: int, classes: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The noise of a chunk and, for a conditional teacher, its labels (uniform over ``classes``, drawn after it)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + chunk) % 2**64)
    x0 = source(size, generator)
    return x0, None if classes is None else torch.randint(classes, (size,), generator=generator)


@keeps_global_rng
def generate_pairs(
    teacher: nn.Module,
    source: Sampler,
    n: int,
    steps: int = 100,
    method: Method = "rk4",
    out: str | Path | None = None,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    *,
    classes: int | None = None,
    guidance: float = 1.0,
) -> PairSet:
    """Push ``n`` source samples through ``teacher``'s ODE; save them in chunks when ``out`` is given.

    Args:
        teacher: velocity model ``v(x, t)``, evaluated in eval mode (each submodule is put back in its mode
            afterwards): BatchNorm uses its running statistics and leaves them and the fingerprint alone.
        source: dataset name or sampler ``f(n, generator)`` of ``x0``.
        n: number of pairs.
        steps, method: the solver of :func:`otcfm.integrate`.
        out: directory of the pair set; an existing one is resumed (missing chunks only). Required
            under torchrun, where each rank makes its share of the chunks and all ranks return the whole set.
        batch_size: pairs per chunk.
        seed: seed of the noise.
        progress: show a progress bar.
        overwrite: replace a pair set in ``out`` made from another teacher or with other settings (its
            ``meta.json`` and chunks; other files stay) instead of refusing it. One made with the same
            settings is kept either way: generating it again would give the same values.
        classes: for a class-conditional teacher ``teacher(x, t, y)``: each pair gets a label drawn uniformly from
            ``0 .. classes - 1`` and is made by the teacher's flow for that class (:attr:`PairSet.y`); a student
            trained on the set is then conditional too.
        guidance: the classifier-free guidance weight of the teacher's flow (:mod:`otcfm.guidance`; needs
            ``classes``).

    Returns:
        the :class:`PairSet` (all chunks, in order).

    Raises:
        ValueError: ``out`` holds pairs from another teacher or other settings, and not ``overwrite``; a chunk in
            ``out`` belongs to another pair set (the message names the file; delete it to make it again).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module called as teacher(x, t), got {type(teacher).__name__}")
    n, steps, batch_size = (check_count(v, k) for k, v in (("n", n), ("steps", steps), ("batch_size", batch_size)))
    seed = check_seed(seed)
    check_flag(overwrite, "overwrite")
    check_flag(progress, "progress")
    check_choice(method, METHODS, "method")
    noise = as_source(source, "source")
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    probe = noise(2, torch.Generator().manual_seed(0))
    if classes is not None:
        check_count(classes, "classes")
    elif guidance != 1.0:
        raise ValueError(f"guidance: {guidance!r} steers a class-conditional teacher; give classes as well")
    probe_labels = None if classes is None else torch.zeros(2, dtype=torch.int64, device=device)
    check_velocity(teacher, probe.to(device), "teacher", y=probe_labels)  # before any file
    meta = {
        "format": PAIR_FORMAT,
        "teacher": teacher_fingerprint(teacher),
        "source": noise.spec,
        # what the source draws, not only its name: two functions (or lambdas) of one name differ here
        "source_draw": content_hash(probe),
        "n": n,
        "steps": steps,
        "method": method,
        "seed": seed,
        "batch_size": batch_size,
        **({"classes": classes, "guidance": float(guidance)} if classes is not None else {}),
    }
    directory = Path(out) if out is not None else None
    if directory is not None and directory.exists() and not directory.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file; expected a directory for the pair set")
    rank, world_size = distributed.world()
    identity = _set_identity(meta)
    if directory is not None:
        if rank == 0:
            identity = _check_or_write_meta(directory, meta, overwrite)
        distributed.barrier()
        if rank > 0:
            identity = _check_or_write_meta(directory, meta)  # reads rank 0's file: the same settings on every rank
    elif world_size > 1:
        raise ValueError("out: a pair set generated by several ranks is shared through a directory; pass out")
    chunks = math.ceil(n / batch_size)
    from tqdm.auto import tqdm

    in_memory: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for k in tqdm(range(rank, chunks, world_size), desc="pairs", unit="chunk", disable=not progress or rank > 0):
        path = directory / f"chunk-{k:05d}.pt" if directory is not None else None
        if path is not None and path.is_file():
            continue  # finished before an interruption
        size = min(batch_size, n - k * batch_size)
        x0, y = _chunk_noise(noise, seed, k, size, classes)
        with _evaluating(teacher):
            labels = None if y is None else y.to(device)
            x1 = integrate(teacher, x0.to(device), steps, method, y=labels, guidance=guidance).cpu()
        if path is None:
            in_memory.append((x0, x1, y))
        else:
            ckpt.atomic_save(
                {"x0": x0, "x1": x1, "set": identity, "chunk": k, **({"y": y} if y is not None else {})}, path
            )
    if directory is None:
        x0s, x1s, ys = zip(*in_memory, strict=True)
        return PairSet(torch.cat(x0s), torch.cat(x1s), meta, None if classes is None else torch.cat(ys))
    distributed.barrier()  # every rank's chunks are on disk
    return _load(directory, "out")


def _describe(pairs: PairSet | PairSource) -> dict[str, Any]:
    """What a run records of its pairs, for resume to compare: a generated set's description (or the source's
    ``repr``), and for a set made by hand (whose description is empty) a hash of its content."""
    if not isinstance(pairs, PairSet):
        return {"pairs": describe(pairs)}
    if pairs.meta:
        return {"pairs": pairs.meta}
    return {"pairs": pairs.meta, "pairs_content": f"{content_hash(pairs.x0)}:{content_hash(pairs.x1)}"}


def _set_identity(meta: dict[str, Any]) -> str:
    """A pair set's identity: SHA-256 (first 16 hex digits) of its settings (``meta`` without ``"set"``)."""
    settings = {k: v for k, v in meta.items() if k != "set"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_or_write_meta(directory: Path, meta: dict[str, Any], overwrite: bool = False) -> str:
    """Write ``meta.json`` of a new pair set; check an existing one against ``meta``, or replace it (``overwrite``).

    Returns:
        the set's identity, which its chunks record: that of the settings on disk.
    """
    path = directory / "meta.json"
    if path.is_file():
        saved = _read_meta(path, "out")
        differing = [k for k in meta if saved.get(k) != meta[k]]
        if not differing:
            return _set_identity(saved)
        if not overwrite:
            details = ", ".join(f"{k}: file {saved.get(k)!r} vs now {meta[k]!r}" for k in differing)
            raise ValueError(
                f"out: {directory} holds pairs made with other settings or another teacher ({details}); "
                "pass overwrite=True (otcfm reflow/distill: --overwrite) to replace them"
            )
        for chunk in directory.glob("chunk-*.pt"):  # the old set's files, nothing else
            chunk.unlink()
        path.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    identity = _set_identity(meta)
    tmp = directory / ".meta.json.tmp"
    tmp.write_text(json.dumps({**meta, "set": identity}, indent=1))
    tmp.replace(path)
    return identity


def _read_meta(path: Path, argument: str) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{argument}: {path} is not a readable pair-set description ({error})") from error
    required = ("format", "n", "batch_size")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) and meta[k] >= 1 for k in required):
        raise ValueError(
            f"{argument}: {path} is not an otcfm pair-set description (needs positive {', '.join(required)})"
        )
    if meta["format"] != PAIR_FORMAT:
        raise ValueError(f"{argument}: {path} has format {meta['format']}; this otcfm reads format {PAIR_FORMAT}")
    return meta


def load_pairs(path: str | Path) -> PairSet:
    """Load a complete pair set written by :func:`generate_pairs`, checking every chunk: its checksum, its size,
    and that it is this set's chunk of that index (each chunk records the set's identity and its index).

    Returns:
        the :class:`PairSet`, ``x0`` and ``x1`` of shape ``(n, ...)``; its ``meta`` holds the settings of
        ``meta.json``.

    Raises:
        FileNotFoundError: no ``meta.json`` there.
        ValueError: chunks are missing (resume with :func:`generate_pairs` and the same settings), or a chunk is
            corrupt, of the wrong size, or from another pair set or position (the message names the file).
    """
    return _load(Path(path), "path")


def _load(directory: Path, argument: str) -> PairSet:
    """:func:`load_pairs`, naming the directory ``argument`` (``"path"``, or ``"out"`` for :func:`generate_pairs`)."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{argument}: no pair set (meta.json) in {directory}")
    meta = _read_meta(meta_path, argument)
    recorded = meta.pop("set", None)
    identity = _set_identity(meta)
    if recorded != identity:
        raise ValueError(
            f"{argument}: {meta_path} records the pair set {recorded!r}, but its settings are those of {identity!r}: "
            "meta.json was edited or copied from another pair set"
        )
    n, size = meta["n"], meta["batch_size"]
    chunks = math.ceil(n / size)
    missing = [k for k in range(chunks) if not (directory / f"chunk-{k:05d}.pt").is_file()]
    if missing:
        raise ValueError(f"{argument}: {len(missing)} of {chunks} chunks missing in {directory}; resume generate_pairs")
    parts = []
    for k in range(chunks):
        chunk = directory / f"chunk-{k:05d}.pt"
        part = ckpt.load(chunk, f"{argument}: pair chunk")
        x0, x1, rows = part.get("x0"), part.get("x1"), min(size, n - k * size)
        if not (isinstance(x0, Tensor) and isinstance(x1, Tensor) and x0.shape == x1.shape and x0.ndim >= 2):
            raise ValueError(f"{argument}: {chunk} does not hold x0 and x1 tensors of one shape (N, ...)")
        if x0.shape[0] != rows or (parts and x0.shape[1:] != parts[0][0].shape[1:]):
            raise ValueError(
                f"{argument}: {chunk} holds {tuple(x0.shape)} pairs; expected {rows} rows like the other chunks "
                "(a file from another pair set?)"
            )
        owner, index = part.get("set"), part.get("chunk")
        if owner != identity or index != k:
            raise ValueError(
                f"{argument}: {chunk} is not chunk {k} of this pair set (it records set {owner!r}, chunk {index!r}; "
                f"this set is {identity!r}): a file copied from another pair set or position? Delete it and resume "
                "generate_pairs with this set's settings to make it again"
            )
        y = part.get("y")
        if "classes" in meta and not (isinstance(y, Tensor) and y.shape == (rows,)):
            raise ValueError(f"{argument}: {chunk} holds no class labels y of shape ({rows},); its set has classes")
        parts.append((x0, x1, y))
    labels = torch.cat([p[2] for p in parts]) if "classes" in meta else None
    return PairSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), meta, labels)


class OnlinePairs:
    """Pairs made on the fly by a frozen teacher: no disk, the teacher's cost paid at every draw.

    Args:
        teacher: velocity model; a frozen copy in eval mode is used.
        source: dataset name or sampler of ``x0``.
        steps, method: the teacher's solver.

    Raises:
        TypeError, ValueError: a teacher that is no module, or that fails on (or returns NaN/Inf or another shape
            for) two samples of ``source`` (named ``teacher``); a bad ``source``, ``steps`` or ``method``.
    """

    def __init__(self, teacher: nn.Module, source: Sampler, steps: int = 20, method: Method = "rk4") -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher: expected an nn.Module called as teacher(x, t), got {type(teacher).__name__}")
        check_count(steps, "steps")
        check_choice(method, METHODS, "method")
        self._source = as_source(source, "source")  # a bad name or object is named now, not at the first draw
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self._device = next(iter(self.teacher.parameters()), torch.empty(0)).device
        check_velocity(self.teacher, self._source(2, torch.Generator().manual_seed(0)).to(self._device), "teacher")
        self.source, self.steps, self.method = source, steps, method

    def __call__(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` fresh pairs ``(x0, teacher(x0))``, each ``(n, ...)`` on the teacher's device."""
        x0 = self._source(n, generator).to(self._device)
        return x0, integrate(self.teacher, x0, self.steps, self.method)

    def __repr__(self) -> str:  # what a run records of these pairs: the same in every process
        return (
            f"OnlinePairs(teacher={teacher_fingerprint(self.teacher)}, source={self._source.fingerprint}, "
            f"steps={self.steps}, method={self.method!r})"
        )


@dataclass(frozen=True)
class RunOptions:
    """Where and how :func:`train_on_pairs` and :func:`distill` run (the engine :func:`otcfm.engine.fit`).

    Attributes:
        out: directory of ``checkpoint.pt`` (None: no checkpoints); a :class:`otcfm.rundir.RunDirectory` whose
            checkpoint the caller read already is resumed from that read.
        resume: continue the run in ``out``.
        overwrite: replace a run in ``out`` (otherwise an existing run there is an error).
        ema_decay: EMA of the weights (0: none); the returned model then holds the EMA weights.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over the steps; :func:`otcfm.engine.learning_rate`).
        grad_clip: gradient-norm clipping (None: none).
        precision: ``"fp32"`` or ``"bf16"``.
        warmup_steps: a linear learning-rate warm-up over the first steps (0: none).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``; None keeps the model where it is.
        checkpoint_every: steps between checkpoints.
        callback: ``callback(step, loss)`` after every step.
        record: extra entries of the checkpoint (the CLI stores the teacher's config there).
    """

    out: str | Path | RunDirectory | None = None
    resume: bool = False
    overwrite: bool = False
    ema_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    grad_clip: float | None = None
    precision: Precision = "fp32"
    device: torch.device | str | None = None
    checkpoint_every: int = 500
    warmup_steps: int = 0
    callback: Callable[[int, float], None] | None = None
    record: dict[str, Any] = field(default_factory=dict)


@keeps_global_rng
def train_on_pairs(
    pairs: PairSet | tuple[Tensor, Tensor] | PairSource,
    model: nn.Module,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    time_sampler: str | TimeSampler = "uniform",
    seed: int = 0,
    progress: bool = True,
    run: RunOptions | None = None,
) -> nn.Module:
    """Train ``model`` (in place) by flow matching on pairs whose pairing is kept (a k-rectified flow).

    Args:
        pairs: a :class:`PairSet`, a tuple ``(x0, x1)`` of tensors, or :class:`OnlinePairs` (any
            ``f(n, generator) -> (x0, x1)``).
        model: the student, e.g. a copy of the teacher (warm start) or a new model.
        steps, batch_size, lr: Adam training.
        time_sampler: ``"uniform"``, ``"logit_normal"``, ``"u_shaped"`` or a callable.
        seed: seed of the draws.
        progress: show a progress bar.
        run: checkpoints, resume, EMA, device, precision (:class:`RunOptions`); none of them when None.

    Returns:
        ``model``, trained, in eval mode.

    Raises:
        TypeError, ValueError: ``pairs`` whose ``x0`` and ``x1`` differ in shape or dtype, are not floating-point,
            hold NaN/Inf, come in another number than asked for (a callable's draws are checked at every step), or
            whose dtype is not that of ``model``'s parameters (cast one of them); bad training settings.
    """
    fm = FlowMatcher(coupler="paired", path="linear", time_sampler=time_sampler)
    _check_training(steps, batch_size, lr)
    settings = {"stage": "reflow", "time_sampler": describe(fm.time_sampler)}

    def loss(net: nn.Module, x0: Tensor, x1: Tensor, generator: torch.Generator, y: Tensor | None) -> Tensor:
        try:
            return fm.loss(net, x0, x1, generator, y1=y)
        except ValueError:
            _check_drawn_finite(x0, x1)  # names pairs where fm.loss named x0 or x1
            raise

    run = run or RunOptions()
    schedule = schedule_from(run, steps=steps, lr=lr, seed=seed)
    return _fit(model, pairs, loss, schedule, batch_size, progress, "reflow", run, settings)


@keeps_global_rng
def distill(
    model: nn.Module,
    pairs: PairSet | tuple[Tensor, Tensor] | PairSource,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    loss: Literal["l2", "pseudo_huber"] = "l2",
    seed: int = 0,
    progress: bool = True,
    run: RunOptions | None = None,
) -> nn.Module:
    r"""Distill a one-step generator: train ``model`` (in place) so that ``x0 + v(x0, 0) ≈ x1``.

    ``integrate(model, x0, steps=1)`` is then the one-step sample. Losses:
    ``"l2"``: ``||x0 + v(x0, 0) - x1||^2``; ``"pseudo_huber"``:
    ``sqrt(||d||^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)`` (Song & Dhariwal 2023).

    Args:
        model: the student (warm-starting from a 2-rectified flow works best).
        pairs: a :class:`PairSet`, a tuple ``(x0, x1)`` of tensors, or any ``f(n, generator) -> (x0, x1)``.
        steps, batch_size, lr: Adam training.
        loss: ``"l2"`` or ``"pseudo_huber"``.
        seed: seed of the draws.
        progress: show a progress bar.
        run: checkpoints, resume, EMA, device, precision (:class:`RunOptions`); none of them when None.

    Returns:
        ``model``, trained, in eval mode.

    Raises:
        TypeError, ValueError: ``pairs`` as in :func:`train_on_pairs`; an unknown ``loss``; bad training settings.
    """
    if loss not in ("l2", "pseudo_huber"):
        raise ValueError(f"loss: unknown value {loss!r}; expected one of 'l2', 'pseudo_huber'")
    _check_training(steps, batch_size, lr)

    def one_step_loss(net: nn.Module, x0: Tensor, x1: Tensor, generator: torch.Generator, y: Tensor | None) -> Tensor:
        t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        v = check_output(net(x0, t) if y is None else net(x0, t, y), x0)
        diff = (x0 + v - x1).reshape(x0.shape[0], -1)
        if loss == "l2":
            value = (diff**2).sum(1).mean()
        else:
            c = 0.00054 * math.sqrt(diff.shape[1])
            value = (torch.sqrt((diff**2).sum(1) + c**2) - c).mean()
        if host_reads_free(value) and not math.isfinite(value.item()):  # on an accelerator the engine reads it
            _check_drawn_finite(x0, x1)
            raise ValueError("model: the loss is NaN or Inf with finite pairs: the model returned NaN/Inf")
        return value

    run = run or RunOptions()
    schedule = schedule_from(run, steps=steps, lr=lr, seed=seed)
    return _fit(model, pairs, one_step_loss, schedule, batch_size, progress, "distill", run, {"loss": loss})


def _check_drawn_finite(x0: Tensor, x1: Tensor) -> None:
    """Raise naming ``pairs`` if ``x0`` or ``x1`` holds NaN or Inf (a read on the host)."""
    for name, x in (("x0", x0), ("x1", x1)):
        if not all_finite(x):
            raise ValueError(f"pairs: {name} contains NaN or Inf")


def _check_training(steps: int, batch_size: int, lr: float) -> None:
    check_count(batch_size, "batch_size")
    Schedule(steps=steps, lr=lr)  # validates steps and lr


def _fit(
    model: nn.Module,
    pairs: PairSet | tuple[Tensor, Tensor] | PairSource,
    loss: Callable[[nn.Module, Tensor, Tensor, torch.Generator, Tensor | None], Tensor],
    schedule: Schedule,
    batch_size: int,
    progress: bool,
    desc: str,
    run: RunOptions,
    settings: dict[str, Any],
) -> nn.Module:
    """Adam on ``loss(net, x0, x1, generator, y)`` over pairs drawn from ``pairs``, through the training engine
    (``y``: the labels of a labelled :class:`PairSet`, else None); ``model`` is trained in place (and given the EMA
    weights when ``run.ema_decay > 0``)."""
    model_dtype = floating_dtype(model)
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, Tensor) for x in pairs):
        _check_pair_tensors(*pairs, "pairs: x0", "pairs: x1")
        pairs = PairSet(*pairs)  # (x0, x1) as a user holds them: checked like a PairSet
    if not callable(pairs):
        raise TypeError(
            "pairs: expected a PairSet, a tuple (x0, x1) of tensors or a callable f(n, generator) -> (x0, x1), "
            f"got {type(pairs).__name__}"
        )
    if isinstance(pairs, PairSet):  # checked once, whole; a callable's draws at every step (their metadata)
        check_dtype_fits(pairs.x0, model_dtype, "pairs", "pairs")
        _check_drawn_finite(pairs.x0, pairs.x1)
    device = run.device if run.device is not None else next(iter(model.parameters()), torch.empty(0)).device
    lr, seed, batch_size = schedule.lr, schedule.seed, check_count(batch_size, "batch_size")
    identity = {
        "stage": desc,
        **settings,
        **_describe(pairs),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "ema_decay": run.ema_decay,
        "lr_schedule": run.lr_schedule,
        "warmup_steps": run.warmup_steps,
        "grad_clip": run.grad_clip,
        "precision": run.precision,
    }
    target_device = resolve_device(device)

    def check_drawn(drawn: Any) -> None:  # a callable's draws: shapes and dtypes, metadata, no synchronisation
        if not (isinstance(drawn, (tuple, list)) and len(drawn) == 2):
            raise TypeError(
                f"pairs: expected f(n, generator) to return a tuple (x0, x1) of tensors, got {type(drawn).__name__}"
            )
        _check_pair_tensors(*drawn, "pairs: x0", "pairs: x1", rows=batch_size)
        check_dtype_fits(drawn[0], model_dtype, "pairs", "pairs")

    labelled = isinstance(pairs, PairSet) and pairs.y is not None
    checked = None if isinstance(pairs, PairSet) else check_drawn
    batches = FixedPairs(pairs, batch_size, target_device, labels=labelled, check=checked)

    def step_loss(net: nn.Module, step: int, generator: torch.Generator) -> Tensor:
        batch = batches(step, generator)
        return loss(net, batch.x0, batch.x1, generator, batch.y1)

    fitted = fit(
        model,
        step_loss,
        schedule,
        run=identity,
        out=run.out,
        resume=run.resume,
        overwrite=run.overwrite,
        device=target_device,
        progress=progress,
        callback=run.callback,
        desc=desc,
        record={"config": None, **run.record, "reflow": identity},
    )
    if fitted.ema is not None:
        model.load_state_dict(fitted.ema.state_dict())
    return model.eval()


@keeps_global_rng
def rectify(
    teacher: nn.Module,
    source: Sampler,
    rounds: int = 1,
    n_pairs: int = 20_000,
    steps: int = 100,
    method: Method = "rk4",
    train_steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    time_sampler: str | TimeSampler = "uniform",
    warm_start: bool = True,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[nn.Module]:
    """k-rectified flow: ``rounds`` times, generate pairs with the current flow and retrain on them.

    Args:
        teacher: the 1-rectified flow (any coupler's model).
        source: dataset name or sampler of ``x0``.
        rounds: k - 1 (1 gives the 2-rectified flow).
        n_pairs, steps, method: pair generation per round.
        train_steps, batch_size, lr, time_sampler: training per round.
        warm_start: start each round from the previous model (a copy); otherwise from fresh weights
            (the teacher's architecture re-initialised from ``seed``).
        out: directory for the pair sets (``out/round-1``, ...); in memory when None.
        seed: seed of noise and training.
        progress: show progress bars.

    Returns:
        the models of rounds 1..rounds (the last is the (rounds + 1)-rectified flow).
    """
    check_count(rounds, "rounds")
    models, current = [], teacher
    for r in range(1, rounds + 1):
        pair_dir = Path(out) / f"round-{r}" if out is not None else None
        pairs = generate_pairs(current, source, n_pairs, steps, method, pair_dir, seed=seed + r, progress=progress)
        student = copy.deepcopy(current)
        if not warm_start:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + r)
                for module in student.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        current = train_on_pairs(pairs, student, train_steps, batch_size, lr, time_sampler, seed + r, progress)
        models.append(current)
    return models

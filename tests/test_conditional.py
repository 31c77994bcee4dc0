"""Class-conditional training through otcfm.train: labels from every kind of data, label dropout, resume, warm-up."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import otcfm
from otcfm.engine import Schedule, learning_rate

TINY = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}


def images(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8x8 images: class 0 bright on the left half, class 1 on the right (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = -torch.ones(n, 1, 8, 8) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, :, :4] += 1.5
    x[y == 1, :, :, 4:] += 1.5
    return x, y


def run(**settings: object) -> otcfm.TrainResult:
    options = {"steps": 6, "batch_size": 8, "model": "unet", "model_options": TINY, "progress": False, "lr": 1e-3}
    options.update(settings)
    return otcfm.train(**options)  # type: ignore[arg-type]


def test_a_labelled_pair_trains_a_conditional_unet_with_label_dropout() -> None:
    x, y = images()
    result = run(target=(x, y))
    assert result.config.conditional is True and result.config.label_dropout == 0.1
    assert result.model.null_label == 2
    out = otcfm.integrate(result.model, torch.randn(4, 1, 8, 8), steps=2, y=torch.tensor([0, 1, 0, 1]), guidance=2.0)
    assert out.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("kind", ["target_labels", "tensordataset", "dataset", "column"])
def test_labels_come_from_every_kind_of_data(kind: str) -> None:
    x, y = images()

    class Items(Dataset):
        def __len__(self) -> int:
            return x.shape[0]

        def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
            return x[k], int(y[k])

    given: dict[str, object] = {
        "target_labels": {"target": x, "target_labels": y.numpy()},
        "tensordataset": {"target": TensorDataset(x, y)},
        "dataset": {"target": Items()},
        "column": {"target": (x.numpy(), y[:, None])},
    }[kind]
    result = run(**given)
    assert result.config.conditional is True and result.model.null_label == 2


def test_same_labelled_data_and_seed_give_the_same_run() -> None:
    x, y = images()
    a = run(target=(x, y))
    b = run(target=x, target_labels=y)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_unconditional_unless_labels_are_asked_for() -> None:
    x, y = images()
    assert run(target=TensorDataset(x, y), conditional=False).config.conditional is False
    mlp = otcfm.train(target=TensorDataset(x, y), steps=2, batch_size=8, progress=False)  # the MLP takes no labels
    assert mlp.config.conditional is False and mlp.config.label_dropout == 0.0
    assert run(target=x).config.conditional is False


def test_bad_label_settings_are_named() -> None:
    x, y = images()
    with pytest.raises(ValueError, match="conditional: the target .* carries no class labels"):
        run(target=x, conditional=True)
    with pytest.raises(ValueError, match="label_dropout: 0.2 drops class labels, and this run is unconditional"):
        run(target=x, label_dropout=0.2)
    with pytest.raises(ValueError, match=r"label_dropout: expected a number in \[0, 1\)"):
        run(target=(x, y), label_dropout=1.0)
    with pytest.raises(ValueError, match="target_labels: expected one label per row"):
        run(target=x, target_labels=y[:10])
    with pytest.raises(TypeError, match="target_labels: expected integer class labels"):
        run(target=x, target_labels=y.float())
    with pytest.raises(ValueError, match="target_labels: expected class labels >= 0"):
        run(target=x, target_labels=y - 1)
    with pytest.raises(ValueError, match="pool_size: OT pools are coupled without labels"):
        run(target=(x, y), pool_size=16)


def test_resume_of_a_conditional_unet_with_label_dropout_and_dropout_is_bit_exact(tmp_path: Path) -> None:
    x, y = images()
    settings = {"target": (x, y), "model_options": {**TINY, "dropout": 0.1}, "warmup_steps": 3, "steps": 8}
    whole = run(**settings, out=tmp_path / "whole")
    run(**{**settings, "steps": 4}, out=tmp_path / "parts")
    resumed = run(**settings, out=tmp_path / "parts", resume=True)
    assert resumed.start_step == 4
    assert whole.losses == resumed.losses
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    loaded, config = otcfm.load_model(tmp_path / "whole")
    assert config is not None and config.conditional and loaded.null_label == 2


def test_resume_refuses_other_labels(tmp_path: Path) -> None:
    x, y = images()
    run(target=(x, y), out=tmp_path)
    with pytest.raises(ValueError, match="labels_fingerprint"):
        run(target=(x, 1 - y), out=tmp_path, resume=True, steps=8)


def test_semidiscrete_pairs_within_classes() -> None:
    x, y = images(32)
    result = run(
        target=(x, y), coupler="semidiscrete", coupler_options={"fit_steps": 20, "fit_batch_size": 64}, steps=3
    )
    assert result.config.conditional is True


def test_warmup_rises_linearly_then_follows_the_schedule() -> None:
    rates = [learning_rate(1.0, "constant", k, 10, warmup_steps=4) for k in range(10)]
    assert rates[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and rates[-1] == 1.0
    cosine = [learning_rate(1.0, "cosine", k, 10, warmup_steps=4) for k in range(10)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0] and cosine[4] == 1.0 and cosine[-1] < 0.1
    assert np.all(np.diff(cosine[4:]) < 0)
    with pytest.raises(ValueError, match="warmup_steps: expected fewer than steps=10"):
        Schedule(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps: expected an integer >= 0"):
        Schedule(steps=10, warmup_steps=-1)


def test_warmup_is_what_the_optimiser_runs_at(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    original = torch.optim.Adam.step

    def spy(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    def step_loss(net: torch.nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        return net(torch.randn(4, 2, generator=generator)).pow(2).mean()

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    otcfm.engine.fit(
        torch.nn.Linear(2, 2), step_loss, Schedule(steps=5, lr=0.4, warmup_steps=4), run={}, progress=False
    )
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])


def test_a_conditional_teacher_gives_labelled_pairs_and_a_conditional_student(tmp_path: Path) -> None:
    from otcfm import reflow

    x, y = images()
    teacher = run(target=(x, y)).model

    def noise(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 1, 8, 8, generator=generator)

    made = {"steps": 2, "method": "euler", "batch_size": 8, "progress": False, "classes": 2, "guidance": 2.0}
    pairs = reflow.generate_pairs(teacher, noise, 20, out=tmp_path / "pairs", **made)
    again = reflow.load_pairs(tmp_path / "pairs")
    in_memory = reflow.generate_pairs(teacher, noise, 20, **made)
    assert pairs.y is not None and pairs.y.shape == (20,) and set(pairs.y.tolist()) <= {0, 1}
    assert torch.equal(pairs.y, again.y) and torch.equal(pairs.y, in_memory.y)
    assert torch.equal(pairs.x1, in_memory.x1)
    k = 3
    expected = otcfm.integrate(teacher, pairs.x0[k : k + 1], 2, y=pairs.y[k : k + 1], guidance=2.0)
    torch.testing.assert_close(pairs.x1[k : k + 1], expected, rtol=1e-5, atol=1e-6)  # the class's guided flow
    seen: list[torch.Tensor] = []
    student = copy.deepcopy(teacher)
    student.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    reflow.distill(student, pairs, steps=2, batch_size=4, progress=False)
    drawn = pairs.labeled(4, torch.Generator().manual_seed(0))[2]
    assert torch.equal(seen[0], drawn)  # the student saw the labels of the pairs it was trained on
    with pytest.raises(ValueError, match="guidance: 2.0 steers a class-conditional teacher; give classes"):
        reflow.generate_pairs(teacher, noise, 4, guidance=2.0, progress=False)

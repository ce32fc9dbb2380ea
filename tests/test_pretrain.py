from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import timm
import torch

from kaggle_utils.cache.preprocess import (
    PreprocessConfig,
    list_series,
    preprocess_dataset,
    shard_tasks,
)
from kaggle_utils.common.backbone import build_backbone, input_normalisation, load_state_dict_file
from kaggle_utils.common.engine import ResumableSampler
from kaggle_utils.common.runtime import copy_previous_run, resolve_precision
from kaggle_utils.finetune.model import build_classifier
from kaggle_utils.pretrain import train as pretrain_module
from kaggle_utils.pretrain.data import (
    AugmentConfig,
    VoCoCropDataset,
    augment_volume,
    exclude_patient_volumes,
    split_probe_volumes,
    volume_files,
)
from kaggle_utils.pretrain.train import (
    NonFiniteLossError,
    PretrainConfig,
    pretrain,
    pretraining_volume_dirs,
)

from conftest import run_torchrun_on_cpu

SHAPE = (8, 64, 64)
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cached (8, 64, 64) volumes of 20 synthetic patients."""
    from kaggle_utils.demo.generator import generate_dataset
    from kaggle_utils.demo.labels import SyntheticConfig

    root = tmp_path_factory.mktemp("pretrain_data")
    config = SyntheticConfig(
        train_patients=20, test_patients=3, image_size=64, min_slices=8, max_slices=10, seed=11
    )
    data = generate_dataset(root / "demo", config)
    cache = root / "cache"
    preprocess_dataset(
        list_series(data, "train"), cache, PreprocessConfig(shapes=(SHAPE,)), workers=0,
        progress=False,
    )  # fmt: skip
    return cache / "8x64x64"


def tiny_config(volume_dir: Path, output_dir: Path, **overrides: object) -> PretrainConfig:
    settings: dict[str, object] = {
        "volume_dirs": [str(volume_dir)],
        "output_dir": str(output_dir),
        "backbone": "test_efficientnet",
        "hidden_dim": 64,
        "out_dim": 64,
        "crop_size": 21,
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 2,
        "num_workers": 0,
        "checkpoint_every": 100,
        "probe_every": 2,
        "n_probe_volumes": 4,
        "probe_random": 8,
    }
    settings.update(overrides)
    return PretrainConfig(**settings)  # type: ignore[arg-type]


def test_dataset_items_and_determinism(volume_dir: Path) -> None:
    files = volume_files([volume_dir])
    dataset = VoCoCropDataset(files, grid=3, n_random=2, crop_size=21, seed=5)
    item = dataset[0]
    assert item["random"].shape == (2, 8, 1, 21, 21) and item["random"].dtype == torch.uint8
    assert item["base"].shape == (9, 8, 1, 21, 21)
    assert item["labels"].shape == (2, 9)
    torch.testing.assert_close(item["labels"].sum(1), torch.ones(2))
    again = dataset[0]
    assert torch.equal(item["random"], again["random"])
    dataset.set_epoch(1)
    assert not torch.equal(item["labels"], dataset[0]["labels"])


def test_augmentation_keeps_shape_and_range() -> None:
    volume = np.random.default_rng(0).integers(0, 256, (4, 1, 10, 12), dtype=np.uint8)
    rng = np.random.default_rng(1)
    out = augment_volume(volume, AugmentConfig(flip_prob=1.0, rot90_prob=0.0, intensity=0.0), rng)
    np.testing.assert_array_equal(out, volume[..., ::-1, ::-1])
    jittered = augment_volume(volume, AugmentConfig(intensity=0.3), rng)
    assert jittered.dtype == np.uint8 and jittered.shape == volume.shape
    assert not np.array_equal(jittered, volume)


def test_sampler_shards_cover_every_item_once_per_epoch_and_resume() -> None:
    shards = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [i for s in shards for i in s]
    assert sorted(seen) == list(range(10))
    first = ResumableSampler(10, seed=3)
    full = list(first)
    first.set_position(0, 4)
    assert list(first) == full[4:]
    first.set_position(1, 0)
    assert sorted(first) == list(range(10)) and list(first) != full


def test_probe_split_is_deterministic_and_disjoint(volume_dir: Path) -> None:
    files = volume_files([volume_dir])
    train, probe = split_probe_volumes(files, 4, seed=0)
    assert len(probe) == 4 and not set(train) & set(probe)
    assert (train, probe) == split_probe_volumes(files, 4, seed=0)
    with pytest.raises(ValueError, match="notebook 01"):
        split_probe_volumes([], 4, seed=0)


def test_a_run_writes_log_checkpoint_and_encoder(volume_dir: Path, tmp_path: Path) -> None:
    result = pretrain(tiny_config(volume_dir, tmp_path), progress=False)
    assert result.finished and result.steps_done == 4
    with open(tmp_path / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]  # step 0: the untrained probe
    assert all(float(r["loss"]) > 0 for r in rows[1:])
    assert rows[0]["probe_accuracy"] and rows[2]["probe_accuracy"] and not rows[1]["probe_accuracy"]
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["backbone"] == "test_efficientnet" and meta["steps"] == 4
    assert set(meta["probe"]) == {"same", "cross"} and meta["chance"] == pytest.approx(1 / 9)
    backbone = build_backbone("test_efficientnet", meta["in_chans"])
    backbone.load_state_dict(load_state_dict_file(result.encoder_file))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 4


def test_progress_in_a_log_is_a_few_lines_not_one_per_step(
    volume_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under papermill every bar refresh becomes a stored line: with stderr not a terminal
    (as here) a run's bar prints its start and its end, not each step."""
    pretrain(tiny_config(volume_dir, tmp_path, steps=8, probe_every=0), progress=True)
    refreshes = capsys.readouterr().err.count("pretrain:")
    assert 1 <= refreshes <= 3, refreshes


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    volume_dir: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    pretrain(tiny_config(volume_dir, straight, steps=5, probe_every=0), progress=False)
    interrupted = tmp_path / "interrupted"
    first = pretrain(
        tiny_config(volume_dir, interrupted, steps=5, probe_every=0, stop_after=3), progress=False
    )
    assert not first.finished and first.steps_done == 3
    second = pretrain(tiny_config(volume_dir, interrupted, steps=5, probe_every=0), progress=False)
    assert second.finished and second.steps_done == 5
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    for part in ("student", "teacher"):
        for key, value in a["modules"][part].items():
            assert torch.equal(value, b["modules"][part][key]), f"{part}.{key} differs after resume"
    assert a["scheduler"] == b["scheduler"]
    with open(interrupted / "log.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4, 5]


def test_a_non_finite_loss_stops_the_run_naming_the_step(
    volume_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = pretrain_module._forward
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> object:
        parts = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(pretrain_module, "_forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3: the loss is not finite"):
        pretrain(tiny_config(volume_dir, tmp_path, probe_every=0), progress=False)


@pytest.mark.parametrize("slice_mode", ["per_slice"])
def test_per_slice_mode_runs(volume_dir: Path, tmp_path: Path, slice_mode: str) -> None:
    result = pretrain(
        tiny_config(volume_dir, tmp_path, steps=2, slice_mode=slice_mode), progress=False
    )
    assert result.finished and result.probe is not None


@pytest.mark.slow
def test_short_pretraining_lifts_the_position_probe(volume_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(
        volume_dir, tmp_path, steps=40, batch_size=8, probe_every=40, probe_random=16, seed=1
    )
    result = pretrain(config, progress=False)
    assert result.initial_probe is not None and result.probe is not None
    chance = result.chance
    assert result.probe["same"] > 3 * chance
    assert result.probe["same"] > result.initial_probe["same"] + 0.05
    assert result.probe["cross"] > result.initial_probe["cross"] + 0.05


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(volume_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(volume_dir, tmp_path, steps=2, probe_every=2)
    config.to_json(tmp_path / "config.json")
    run_torchrun_on_cpu("kaggle_utils.pretrain.train", tmp_path / "config.json")
    with open(tmp_path / "log.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [0, 1, 2]  # rank 0 logs once
    assert (tmp_path / "encoder.pt").is_file()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["step"] == 2


def test_a_stopped_run_resumes_in_a_fresh_folder_from_a_copy(
    volume_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kaggle: the next session's output_dir is empty and the stopped run is read-only input.
    straight = tmp_path / "straight"
    pretrain(tiny_config(volume_dir, straight, steps=5, probe_every=0), progress=False)
    previous = tmp_path / "input" / "pretrain"
    pretrain(tiny_config(volume_dir, previous, steps=5, probe_every=0, stop_after=3), False)
    (previous / ".checkpoint.pt.99.tmp").write_bytes(b"half a file of a killed write")
    working = tmp_path / "working" / "pretrain"
    working.mkdir(parents=True)

    real_copy = shutil.copyfile

    def killed_at_the_checkpoint(source: Path, target: Path) -> None:
        if Path(source).name == "checkpoint.pt":
            raise KeyboardInterrupt("session ended")
        real_copy(source, target)

    monkeypatch.setattr(shutil, "copyfile", killed_at_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        copy_previous_run(previous, working)
    assert (working / "log.csv").is_file() and not (working / "checkpoint.pt").exists()
    monkeypatch.setattr(shutil, "copyfile", real_copy)

    assert copy_previous_run(previous, working)  # no resume point yet: copied again
    assert not list(working.glob("*.tmp"))
    assert not copy_previous_run(previous, working)  # now it has one: left alone
    resumed = pretrain(tiny_config(volume_dir, working, steps=5, probe_every=0), progress=False)
    assert resumed.finished and resumed.steps_done == 5
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(working / "checkpoint.pt", weights_only=True)
    student_a, student_b = a["modules"]["student"], b["modules"]["student"]
    assert all(torch.equal(value, student_b[key]) for key, value in student_a.items())
    with pytest.raises(FileNotFoundError, match="holds no resume point"):
        copy_previous_run(tmp_path / "input", tmp_path / "elsewhere")  # the dataset, not the run
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        copy_previous_run(tmp_path / "missing", tmp_path / "elsewhere")


def test_pretraining_reads_several_caches(tiny_competition: Path, tmp_path: Path) -> None:
    tasks = list_series(tiny_competition, "train")
    config = PreprocessConfig(shapes=((8, 32, 32),))
    for index in range(2):
        shard = shard_tasks(tasks, index, 2)
        preprocess_dataset(shard, tmp_path / f"cache-{index}", config, workers=0, progress=False)
    folders, extras = pretraining_volume_dirs(str(tmp_path / "cache-*"), (8, 32, 32))
    assert folders == [str(tmp_path / f"cache-{i}" / "8x32x32") for i in range(2)] and not extras
    files = volume_files([Path(f) for f in folders])
    assert sorted(int(f.stem) for f in files) == sorted(t.series_id for t in tasks)
    shutil.copytree(tmp_path / "cache-0", tmp_path / "cache-2")  # the same series twice
    with pytest.warns(UserWarning, match="more than one folder"):
        files = volume_files([Path(f) for f in pretraining_volume_dirs(
            [tmp_path / "cache-0", tmp_path / "cache-1", tmp_path / "cache-2"], (8, 32, 32)
        )[0]])  # fmt: skip
    assert sorted(int(f.stem) for f in files) == sorted(t.series_id for t in tasks)
    with pytest.raises(FileNotFoundError, match="holds no volumes"):
        pretraining_volume_dirs(tmp_path / "cache-0", (16, 32, 32))
    for record_file in (tmp_path / "cache-2" / "records").glob("*.json"):
        record = json.loads(record_file.read_text())
        record["settings"]["body_crop"] = False
        record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="made differently"):
        pretraining_volume_dirs([tmp_path / "cache-1", tmp_path / "cache-2"], (8, 32, 32))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_student_feature_dropout_makes_the_inter_loss_nonzero_from_step_1(
    volume_dir: Path, tmp_path: Path, dropout: float
) -> None:
    """Without dropout the teacher starts as an exact copy of the student: the inter loss of
    step 1 is exactly 0 (and then fades as the two converge). With the official code's
    student dropout the two differ from the start; the teacher never drops features."""
    config = tiny_config(volume_dir, tmp_path, steps=1, probe_every=100, feature_dropout=dropout)
    pretrain(config, progress=False)
    with open(tmp_path / "log.csv") as handle:
        step_1 = next(r for r in csv.DictReader(handle) if r["step"] == "1")
    if dropout == 0.0:
        assert abs(float(step_1["inter"])) < 1e-5  # -log(1 + 1e-6): the distance is 0
    else:
        assert float(step_1["inter"]) > 1e-4
    model, _, _ = pretrain_module.build_voco(config, 1, torch.device("cpu"))
    assert model.student.feature_dropout.p == dropout and model.teacher.feature_dropout.p == 0.0


@pytest.mark.parametrize("projector_input", ["pooled", "flatten"])
def test_projector_input_sizes_the_projector_and_a_step_runs(
    tmp_path: Path, projector_input: str
) -> None:
    """The official 2D-VoCo code's "flatten" feeds the projector the backbone's final feature
    map, C x h x w values, sized by a dummy forward; "pooled" its pooled C features."""
    config = tiny_config(tmp_path, tmp_path, crop_size=64, projector_input=projector_input)
    model, loss_fn, optimizer = pretrain_module.build_voco(config, 1, CPU)
    backbone = model.student.backbone
    with torch.no_grad():
        feature_map = backbone.eval().forward_features(torch.zeros(1, 1, 64, 64))
    assert feature_map.shape == (1, 256, 2, 2)  # test_efficientnet: 256 channels, stride 32
    width = 256 * 2 * 2 if projector_input == "flatten" else 256
    for encoder in (model.student, model.teacher):
        assert encoder.projector.layers[0].in_features == width
    model.train()
    assert model.student.backbone_features(torch.zeros(5, 1, 64, 64)).shape == (5, width)
    assert model.student(torch.zeros(4, 3, 1, 64, 64)).shape == (4, config.out_dim)

    # one training step through the loop's own forward: 2 volumes, 2 random + 9 bases, 3 slices
    generator = torch.Generator().manual_seed(0)
    batch = {
        "random": torch.randint(0, 256, (2, 2, 3, 1, 64, 64), generator=generator).byte(),
        "base": torch.randint(0, 256, (2, 9, 3, 1, 64, 64), generator=generator).byte(),
        "labels": torch.rand(2, 2, 9, generator=generator),
    }
    mean, std = input_normalisation(backbone, CPU)
    parts = pretrain_module._forward(
        model.student, model.teacher, loss_fn, batch, mean, std, config,
        resolve_precision("fp32", CPU),
    )  # fmt: skip
    assert all(np.isfinite(v) for v in parts.as_floats().values())
    before = model.student.projector.layers[0].weight.detach().clone()
    parts.total.backward()
    optimizer.step()
    assert not torch.equal(before, model.student.projector.layers[0].weight)


@pytest.mark.parametrize("projector_input", ["pooled", "flatten"])
def test_either_projector_input_exports_a_backbone_fine_tuning_loads(
    volume_dir: Path, tmp_path: Path, projector_input: str
) -> None:
    config = tiny_config(
        volume_dir, tmp_path, steps=1, probe_every=100, projector_input=projector_input
    )
    result = pretrain(config, progress=False)
    encoder = load_state_dict_file(result.encoder_file)
    classifier = build_classifier(
        "test_efficientnet", 1, "voco", result.encoder_file, hidden_size=8, num_layers=1
    )
    loaded = classifier.backbone.state_dict()
    assert set(loaded) == set(encoder)  # the backbone alone, whatever fed the projector
    assert all(torch.equal(value, loaded[key]) for key, value in encoder.items())


def test_student_and_teacher_start_from_a_local_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ImageNet init as the official code (both networks pretrained), from a local file only."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    imagenet_like = timm.create_model("test_efficientnet", pretrained=False)  # RGB, 1000 classes
    generator = torch.Generator().manual_seed(7)
    known = {
        key: torch.rand(value.shape, generator=generator) + 0.5
        if value.is_floating_point() else value.clone()
        for key, value in imagenet_like.state_dict().items()
    }  # fmt: skip
    weights = tmp_path / "test_efficientnet_imagenet.pth"
    torch.save(known, weights)
    config = tiny_config(tmp_path, tmp_path, weights_file=str(weights))
    model, _, _ = pretrain_module.build_voco(config, 1, CPU)

    student = model.student.backbone.state_dict()
    assert config.projector_input == "flatten"  # its sizing forward leaves BatchNorm stats alone
    assert set(student) == set(known) - {"classifier.weight", "classifier.bias"}
    for key, value in student.items():
        # timm sums the RGB stem over its input channels for one-channel CT
        expected = known[key].sum(dim=1, keepdim=True) if key == "conv_stem.weight" else known[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    teacher = model.teacher.state_dict()  # an exact copy of the initialised student
    assert set(teacher) == set(model.student.state_dict())
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, teacher[key]), f"teacher {key} differs from the student"
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        pretrain_module.build_voco(
            tiny_config(tmp_path, tmp_path, weights_file=str(tmp_path / "missing.pth")), 1, CPU
        )


def test_notebook_02_defaults_are_pretrain_configs() -> None:
    source = (ROOT / "notebooks" / "02_voco2d_pretrain.py").read_text()
    cell = source.split('# %% tags=["parameters"]\n', 1)[1].split("\n# %%", 1)[0]
    parameters: dict[str, object] = {}
    exec(cell, {}, parameters)  # literal assignments only
    parameters["momentum_end"] = parameters["momentum_end"] or None  # 0 in the notebook: None
    defaults = PretrainConfig()
    shared = [f.name for f in dataclasses.fields(PretrainConfig) if f.name in parameters]
    assert {"steps", "warmup_steps", "inter_form", "projector_input"} <= set(shared)
    for name in shared:
        if name == "output_dir":  # "" in the notebook: its platform's default folder
            continue
        if parameters[name] is None and name in PretrainConfig.recipe_fields():
            continue  # the recipe's value
        assert parameters[name] == getattr(defaults, name), name


def test_new_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inter_form"):
        tiny_config(tmp_path, tmp_path, inter_form="other")
    with pytest.raises(ValueError, match="projector_input"):
        tiny_config(tmp_path, tmp_path, projector_input="other")
    defaults = PretrainConfig()
    assert (defaults.inter_form, defaults.projector_input) == ("voco_code", "flatten")
    assert (defaults.steps, defaults.warmup_steps) == (250_000, 5_000)


def test_held_out_patients_are_left_out_and_the_rest_listed(tmp_path: Path) -> None:
    """A held-out patient's volumes never reach pretraining; volumes.parquet-style rows name
    each kept volume's series and patient (null for extra CT outside notebook 01's cache)."""
    cache = tmp_path / "cache"
    shape_dir = cache / "4x16x16"
    shape_dir.mkdir(parents=True)
    extra = tmp_path / "extra" / "4x16x16"
    extra.mkdir(parents=True)
    series = {11: 1, 12: 1, 21: 2, 31: 3}  # series_id -> patient_id
    for series_id in series:
        np.save(shape_dir / f"{series_id}.npy", np.zeros((4, 16, 16), np.uint8))
    np.save(extra / "flare_0001.npy", np.zeros((4, 16, 16), np.uint8))
    pl.DataFrame(
        {"series_id": list(series), "patient_id": list(series.values()), "status": ["ok"] * 4}
    ).write_parquet(cache / "metadata.parquet")
    files = volume_files([shape_dir, extra])
    kept, table = exclude_patient_volumes(files, [1, 3])
    assert sorted(f.name for f in kept) == ["21.npy", "flare_0001.npy"]
    assert table.sort("volume").rows() == [("21.npy", 21, 2), ("flare_0001.npy", None, None)]
    everything, full = exclude_patient_volumes(files, [])
    assert everything == files and full.height == 5
    with pytest.raises(ValueError, match="traced to a patient"):
        exclude_patient_volumes([extra / "flare_0001.npy"], [1])

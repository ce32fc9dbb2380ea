"""ImageNet weights attached to a Kaggle notebook as a Kaggle Model or Dataset, in timm's
Hugging Face layout (`save_for_hf`: model.safetensors / pytorch_model.bin + config.json):
loaded from a folder with the first convolution adapted, found among the inputs by backbone
name, refused for another architecture, and never downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

from kaggle_utils.common import backbone as backbone_module
from kaggle_utils.common import paths
from kaggle_utils.common.backbone import (
    build_backbone,
    describe_weights,
    find_backbone_weights,
    input_normalisation,
    resolve_weights,
    weights_in_folder,
)

ARCH = "test_efficientnet"  # timm's tiny test model (a few hundred KB)
PLATFORM_VARIABLES = ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", paths.FAKE_ROOT_ENV)
# not the first conv (adapted to in_chans) nor the classifier (dropped with num_classes=0)
PROBE = "blocks.0.0.conv.weight"


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a download was attempted: {args} {kwargs}")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way timm and huggingface_hub fetch weights fails the test if called."""
    import huggingface_hub
    import timm.models._builder as builder
    import timm.models._hub as hub

    for module, names in (
        (huggingface_hub, ("hf_hub_download", "snapshot_download")),
        (hub, ("hf_hub_download", "download_cached_file", "load_state_dict_from_hf")),
        (builder, ("load_state_dict_from_url", "download_cached_file", "load_state_dict_from_hf")),
        (torch.hub, ("load_state_dict_from_url", "download_url_to_file")),
    ):
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _no_download)


@pytest.fixture
def kaggle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/kaggle/input on a fake Kaggle (KAGGLE_UTILS_FAKE_ROOT), with a project checkout of its
    own (an empty inputs/), so nothing outside tmp_path is searched."""
    for name in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "root"
    monkeypatch.setenv(paths.FAKE_ROOT_ENV, str(root))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    project = tmp_path / "project"
    (project / "inputs").mkdir(parents=True)
    monkeypatch.setattr(paths, "project_root", lambda: project)
    monkeypatch.chdir(tmp_path)
    kaggle_input = paths.kaggle_input()
    # the competition data sits beside the weights: never entered
    (kaggle_input / paths.COMPETITION_NAME / "train_images" / "10004").mkdir(parents=True)
    return kaggle_input


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """test_efficientnet saved by timm itself in the Hugging Face layout (both files), with
    its random weights."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    folder = tmp_path_factory.mktemp("hf") / f"{ARCH}.r160_in1k"
    save_for_hf(model, str(folder), safe_serialization="both")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return folder, state


def _attach(saved_folder: Path, kaggle_input: Path, slug: str = "test-efficientnet") -> Path:
    """The folder as a Kaggle Model mounts it: /kaggle/input/<slug>/pytorch/default/1/."""
    version = kaggle_input / slug / "pytorch" / "default" / "1"
    shutil.copytree(saved_folder, version)
    return version


def test_timm_saves_the_hugging_face_layout(saved: tuple[Path, dict]) -> None:
    folder, _ = saved
    assert {p.name for p in folder.iterdir()} >= {
        "model.safetensors",
        "pytorch_model.bin",
        "config.json",
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCH and config["pretrained_cfg"]["tag"] == "r160_in1k"
    assert weights_in_folder(folder) == folder / "model.safetensors"


@pytest.mark.parametrize("keep", ["model.safetensors", "pytorch_model.bin"])
def test_a_folder_loads_its_weights_and_adapts_the_first_conv(
    saved: tuple[Path, dict], kaggle: Path, tmp_path: Path, keep: str
) -> None:
    folder, state = saved
    version = _attach(folder, kaggle)
    other = "pytorch_model.bin" if keep == "model.safetensors" else "model.safetensors"
    (version / other).unlink()
    assert weights_in_folder(version) == version / keep

    random = build_backbone(ARCH, in_chans=3)
    assert not torch.equal(random.state_dict()[PROBE], state[PROBE])
    rgb = build_backbone(ARCH, in_chans=3, weights_file=version)
    assert torch.equal(rgb.state_dict()[PROBE], state[PROBE])
    assert torch.equal(rgb.conv_stem.weight, state["conv_stem.weight"])

    grey = build_backbone(ARCH, in_chans=1, weights_file=str(version))
    assert torch.equal(grey.state_dict()[PROBE], state[PROBE])
    assert grey.conv_stem.weight.shape[1] == 1
    # timm sums the RGB filters for one channel
    expected = state["conv_stem.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(grey.conv_stem.weight, expected)
    assert grey(torch.randn(2, 1, 64, 64)).shape == (2, grey.num_features)


def test_the_slug_folder_and_a_single_file_load_too(saved: tuple[Path, dict], kaggle: Path) -> None:
    folder, state = saved
    _attach(folder, kaggle)
    slug = kaggle / "test-efficientnet"  # the Kaggle Model's top folder: weights 3 levels down
    model = build_backbone(ARCH, in_chans=1, weights_file=slug)
    assert torch.equal(model.state_dict()[PROBE], state[PROBE])
    assert resolve_weights(str(slug), ARCH, "imagenet") == str(slug / "pytorch/default/1")

    loose = kaggle / "my-weights" / f"{ARCH}.r160_in1k.safetensors"  # a dataset of one file
    loose.parent.mkdir()
    shutil.copy(folder / "model.safetensors", loose)
    model = build_backbone(ARCH, in_chans=3, weights_file=loose)
    assert torch.equal(model.state_dict()[PROBE], state[PROBE])
    # the same path written as on Kaggle, found under the fake root's /kaggle/input
    assert resolve_weights(f"/kaggle/input/my-weights/{loose.name}", ARCH, "auto") == str(loose)


def test_the_folders_normalisation_comes_from_its_config(
    saved: tuple[Path, dict], kaggle: Path
) -> None:
    folder, _ = saved
    version = _attach(folder, kaggle)
    config = json.loads((version / "config.json").read_text())
    config["pretrained_cfg"] |= {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (version / "config.json").write_text(json.dumps(config))
    model = build_backbone(ARCH, in_chans=1, weights_file=version)
    mean, std = input_normalisation(model, torch.device("cpu"))
    assert (float(mean), float(std)) == (0.5, 0.25)
    assert model.pretrained_cfg["file"] == str(version / "model.safetensors")


def test_find_backbone_weights_by_config_name_and_file(
    saved: tuple[Path, dict], kaggle: Path
) -> None:
    folder, _ = saved
    version = _attach(folder, kaggle, slug="some-upload")  # only config.json names it
    assert find_backbone_weights(ARCH) == version
    assert find_backbone_weights(f"{ARCH}.r160_in1k") == version  # the tag is ignored
    assert find_backbone_weights("efficientnetv2_rw_t") is None
    assert find_backbone_weights("test_efficientnet_gn") is None
    assert find_backbone_weights(ARCH, roots=[kaggle / "nowhere"]) is None

    # a folder named after the backbone (no config.json), and a file: config wins, then order
    named = kaggle / "test-efficientnet" / "pytorch" / "default" / "1"
    named.mkdir(parents=True)
    shutil.copy(folder / "pytorch_model.bin", named / "weights.pth")
    loose = kaggle / "aaa-files" / f"{ARCH}-0123abcd.pth"
    loose.parent.mkdir()
    shutil.copy(folder / "pytorch_model.bin", loose)
    assert find_backbone_weights(ARCH) == version
    shutil.rmtree(kaggle / "some-upload")
    assert find_backbone_weights(ARCH) == named
    shutil.rmtree(kaggle / "test-efficientnet")
    assert find_backbone_weights(ARCH) == loose


def test_the_newer_kaggle_mount_layout_and_the_project_inputs_are_searched(
    saved: tuple[Path, dict], kaggle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = saved
    mounted = kaggle / "models" / "someone" / "test-efficientnet" / "pytorch" / "default" / "2"
    shutil.copytree(folder, mounted)  # 6 levels under /kaggle/input, 4 under models/someone
    assert find_backbone_weights(ARCH) == mounted

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")  # locally only the project's inputs/
    assert find_backbone_weights(ARCH) is None
    local = tmp_path / "project" / "inputs" / f"{ARCH}.r160_in1k"
    shutil.copytree(folder, local)
    assert find_backbone_weights(ARCH) == local


def test_big_trees_are_not_walked(saved: tuple[Path, dict], kaggle: Path) -> None:
    folder, _ = saved
    competition = kaggle / paths.COMPETITION_NAME
    shutil.copytree(folder, competition / "pytorch" / "default" / "1")
    cache = kaggle / "voco2d-cache-0" / "cache"
    for index in range(backbone_module.MAX_SUBFOLDERS + 1):
        (cache / f"{index:05d}").mkdir(parents=True)
    shutil.copytree(folder, cache / "00000" / "weights")
    deep = kaggle / "a" / "b" / "c" / "d" / "e"  # 5 levels: deeper than a Kaggle Model
    shutil.copytree(folder, deep)
    assert find_backbone_weights(ARCH) is None


def test_another_architectures_folder_is_refused_clearly(
    saved: tuple[Path, dict], kaggle: Path
) -> None:
    folder, _ = saved
    version = _attach(folder, kaggle)
    config = json.loads((version / "config.json").read_text())
    config["architecture"] = "efficientnetv2_rw_t"
    config["pretrained_cfg"]["tag"] = "ra2_in1k"
    (version / "config.json").write_text(json.dumps(config))

    message = (
        r"holds timm weights for 'efficientnetv2_rw_t.ra2_in1k'.*backbone='efficientnetv2_rw_t'"
    )
    with pytest.raises(ValueError, match=message):
        build_backbone(ARCH, in_chans=1, weights_file=version)
    with pytest.raises(ValueError, match=message):
        build_backbone(ARCH, in_chans=1, weights_file=kaggle / "test-efficientnet")
    with pytest.raises(ValueError, match=message):
        resolve_weights(str(version / "model.safetensors"), ARCH, "imagenet")
    # the search does not offer it for test_efficientnet, though the slug is named so
    assert find_backbone_weights(ARCH) is None
    assert find_backbone_weights("efficientnetv2_rw_t") == version


def test_resolve_weights_for_each_init(saved: tuple[Path, dict], kaggle: Path) -> None:
    folder, _ = saved
    assert resolve_weights("", ARCH, "random") == ""
    assert resolve_weights("", ARCH, "auto") == ""
    assert resolve_weights("", ARCH, "voco") == ""  # the encoder replaces the weights
    with pytest.raises(FileNotFoundError) as missing:
        resolve_weights("", ARCH, "imagenet")
    advice = str(missing.value)
    for words in (
        f"no ImageNet weights for {ARCH}",
        "Kaggle Model or Dataset",
        "Hugging Face layout",
        "model.safetensors",
        "weights_file=",
        "init='random'",
        "nothing is downloaded",
    ):
        assert words in advice, advice

    version = _attach(folder, kaggle)
    assert resolve_weights("", ARCH, "imagenet") == str(version)
    assert resolve_weights("", ARCH, "auto") == str(version)
    assert resolve_weights(str(version), ARCH, "random") == ""
    assert resolve_weights(str(version), ARCH, "imagenet") == str(version)
    with pytest.raises(FileNotFoundError, match="not found \\(nothing is downloaded\\)"):
        resolve_weights("/kaggle/input/absent/model.safetensors", ARCH, "imagenet")
    with pytest.raises(FileNotFoundError, match="not found \\(nothing is downloaded\\)"):
        build_backbone(ARCH, 1, "/kaggle/input/absent")

    empty = kaggle / "empty-dataset"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights folders"):
        resolve_weights(str(empty), ARCH, "auto")

    assert describe_weights("") == "backbone weights: random init (no ImageNet weights)"
    line = describe_weights(resolve_weights("", ARCH, "imagenet"))
    assert f"timm {ARCH}.r160_in1k" in line and str(version / "model.safetensors") in line


def test_hub_names_are_refused() -> None:
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        build_backbone(f"hf-hub:timm/{ARCH}.r160_in1k", in_chans=1)


def test_the_offline_guard_catches_a_download() -> None:
    """The autouse guard is real: timm's own hub loading is stopped by it."""
    with pytest.raises(AssertionError, match="a download was attempted"):
        timm.create_model(ARCH, pretrained=True)

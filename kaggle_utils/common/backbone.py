"""The timm backbone every stage builds (offline: ImageNet weights from a local file or
folder, or none), finding such weights among a notebook's attached inputs, reading a weights
file safely, and the backbone's input normalisation.

Every checkpoint is read with `torch.load(..., weights_only=True)` (or as safetensors) so
that a file from a shared Kaggle dataset can never run code. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import Tensor, nn

from kaggle_utils.common import paths

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's save_for_hf, preferred
SEARCH_DEPTH = 4  # Kaggle Models: <slug>/<framework>/<variation>/<version>
MAX_SUBFOLDERS = 64  # a folder with more is data (scans, a cache), never walked into
# `pretrained_cfg` entries of a weights folder's config.json that describe its weights (the
# normalisation `input_normalisation` reads, and the channels timm adapts the first conv from)
CONFIG_OVERLAY_KEYS = ("tag", "mean", "std", "input_size", "interpolation", "crop_pct")


def build_backbone(
    name: str = "efficientnetv2_rw_t",
    in_chans: int = 1,
    weights_file: str | Path | None = None,
    **timm_kwargs: object,
) -> nn.Module:
    """A timm model that maps (N, in_chans, H, W) to pooled features (N, feature_dim).

    `weights_file`: ImageNet weights as a local file, or a folder in timm's Hugging Face layout
    (`model.safetensors` and/or `pytorch_model.bin` with `config.json`, as a Kaggle Model or
    Dataset attaches them; a folder holding one in its subfolders, e.g. a Kaggle Model's
    `<slug>`, works too). timm loads it and adapts the first convolution to `in_chans`; a
    folder's config.json also supplies its weights' mean/std. Without it the weights are
    random. Never downloads.

    Raises:
        FileNotFoundError: `weights_file` is given but does not exist or holds no weights
            (timm would otherwise try to download the weights).
        ValueError: the folder's config.json names another architecture than `name`, it holds
            several candidate weight files, or `name` is an `hf-hub:` name (a download).
    """
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise ValueError(
            f"backbone {name!r} would be downloaded from the Hugging Face Hub: pass the timm "
            "architecture name and the attached weights folder as weights_file"
        )
    if not weights_file:
        return timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs
        )
    source = resolve_weights_source(weights_file, name)
    file = source if source.is_file() else weights_in_folder(source)
    assert file is not None  # resolve_weights_source returns a folder only with weights in it
    config = _config_for(source)
    overlay: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in (config.get("pretrained_cfg") or {}).items()
        if key in CONFIG_OVERLAY_KEYS
    }
    # "file" is timm's local-file source; it outranks the url/hf_hub_id of the default cfg, and
    # an empty "source" keeps timm from reading the cfg as a hub model (never a download).
    overlay |= {"file": str(file), "source": ""}
    return timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=overlay,
        num_classes=0,
        in_chans=in_chans,
        **timm_kwargs,
    )


def resolve_weights_source(weights_file: str | Path, backbone: str) -> Path:
    """The weights `weights_file` names, found as `paths.find_inputs` finds any input: that
    file, or the folder holding the weights (the folder itself, or, for e.g. a Kaggle Model's
    `<slug>` folder, the subfolder `find_backbone_weights` picks in it). Checked against
    `backbone` by any config.json that describes them.

    Raises:
        FileNotFoundError: nothing there, or a folder without weights (nothing is downloaded).
        ValueError: the weights are for another architecture, or a folder holds several files.
    """
    found = paths.find_inputs(weights_file)
    if not found:
        raise FileNotFoundError(
            f"weights_file {weights_file} not found (nothing is downloaded)"
            f"{paths.where_kaggle_looked()}"
        )
    path = next((p for p in found if p.is_file()), found[0])
    _check_architecture(_config_for(path), path if path.is_dir() else path.parent, backbone)
    if path.is_file() or weights_in_folder(path) is not None:
        return path
    nested = find_backbone_weights(backbone, roots=[path])
    if nested is None:  # not recognisably this backbone's: the one weights folder in it, if any
        holding = [
            folder
            for folder in _walk(path, SEARCH_DEPTH, skip=())
            if weights_in_folder(folder, strict=False) is not None
        ]
        for folder in holding:
            _check_architecture(read_weights_config(folder), folder, backbone)
        if len(holding) != 1:
            listed = f" ({', '.join(map(str, holding[:4]))}: pass one)" if holding else ""
            raise FileNotFoundError(
                f"weights_file {weights_file}: {'several' if holding else 'no'} weights "
                f"folders in {path}{listed} (looked for {' or '.join(HF_WEIGHT_FILES)}, or one "
                "*.safetensors/*.pth/*.bin; nothing is downloaded)"
            )
        nested = holding[0]
    return resolve_weights_source(nested, backbone)


def _config_for(path: Path) -> dict[str, Any]:
    """The config.json that describes weights at `path`: a folder's own, or the one beside a
    file with timm's Hugging Face name (model.safetensors, pytorch_model.bin); else {}."""
    if path.is_dir():
        return read_weights_config(path)
    return read_weights_config(path.parent) if path.name in HF_WEIGHT_FILES else {}


def weights_in_folder(folder: str | Path, *, strict: bool = True) -> Path | None:
    """The weights file in a timm/Hugging Face model folder: `model.safetensors`, else
    `pytorch_model.bin`, else its only *.safetensors/*.pth/*.bin; None if it has none.

    Raises:
        ValueError: (`strict`) several candidates and none with timm's names; without
            `strict`, None then.
    """
    folder = Path(folder)
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    except OSError:
        return None
    if len(files) > 1:
        if not strict:
            return None
        listed = ", ".join(p.name for p in files[:6])
        raise ValueError(
            f"{folder} holds several weight files ({listed}): pass the one to use as weights_file"
        )
    return files[0] if files else None


def read_weights_config(folder: str | Path) -> dict[str, Any]:
    """The config.json of a timm model folder (`save_for_hf`'s), or {} when there is none or
    it is not a JSON object."""
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def config_architecture(config: dict[str, Any]) -> str:
    """The timm architecture a folder's config.json names ("" if none), with its tag when the
    config has one: "efficientnetv2_rw_t.ra2_in1k"."""
    pretrained = config.get("pretrained_cfg")
    pretrained = pretrained if isinstance(pretrained, dict) else {}
    architecture = config.get("architecture") or pretrained.get("architecture") or ""
    if not isinstance(architecture, str):
        return ""
    tag = pretrained.get("tag")
    if tag and "." not in architecture and isinstance(tag, str):
        return f"{architecture}.{tag}"
    return architecture


def _base_name(name: str) -> str:
    """A timm name without its pretrained tag, comparable with a Kaggle slug:
    "efficientnetv2_rw_t.ra2_in1k" and "efficientnetv2-rw-t" both give "efficientnetv2_rw_t"."""
    return name.split(".", 1)[0].strip().lower().replace("-", "_")


def _check_architecture(config: dict[str, Any], folder: Path, backbone: str) -> None:
    architecture = config_architecture(config)
    if architecture and _base_name(architecture) != _base_name(backbone):
        held = architecture.split(".", 1)[0]
        raise ValueError(
            f"{folder} holds timm weights for {architecture!r} (its config.json), not for "
            f"backbone {backbone!r}: pass backbone={held!r} to use them, or a weights_file "
            f"(or attached Kaggle Model) of {_base_name(backbone)} weights"
        )


def _walk(root: Path, depth: int, skip: Sequence[Path]) -> list[Path]:
    """`root` and its folders down to `depth` levels, in sorted order, not entering hidden
    folders, the competition data, any folder in `skip`, or the subfolders of one with more
    than MAX_SUBFOLDERS of them (scans, a cache: never weights)."""
    folders = [root]
    if depth <= 0:
        return folders
    try:
        subfolders = sorted(
            Path(entry.path)
            for entry in os.scandir(root)
            if entry.is_dir() and not entry.name.startswith((".", "__"))
        )
    except OSError:
        return folders
    if len(subfolders) > MAX_SUBFOLDERS:
        return folders
    for sub in subfolders:
        if sub.name == paths.COMPETITION_NAME or sub in skip:
            continue
        folders += _walk(sub, depth - 1, skip)
    return folders


def default_weight_roots() -> list[Path]:
    """Where `find_backbone_weights` looks by default: on Kaggle every input mount
    (/kaggle/input and, in newer sessions, its datasets/<owner>/, models/<owner>/, ...
    folders; under KAGGLE_UTILS_FAKE_ROOT in tests), then the project's inputs/ folder."""
    roots = paths.kaggle_input_roots() if paths.on_kaggle() else []
    local = paths.project_root() / "inputs"
    if local.is_dir() and local not in roots:
        roots.append(local)
    return roots


def find_backbone_weights(backbone: str, roots: Sequence[str | Path] | None = None) -> Path | None:
    """ImageNet weights for `backbone` among the attached inputs, or None.

    Looks `SEARCH_DEPTH` levels under each root (default: `default_weight_roots()`), which
    reaches a Kaggle Model's `<slug>/<framework>/<variation>/<version>/` folder, for, in this
    order of preference: (1) a folder whose config.json names the architecture (the part
    before "." compared, so any pretrained tag matches) and that holds a weights file; (2) a
    folder holding weights that is, or lies under, a folder named `<backbone>` or
    `<backbone>.<tag>` ("-" read as "_", as in Kaggle slugs) without a config.json naming
    another architecture; (3) a file `<backbone>.safetensors|.pth|.bin`,
    `<backbone>.<tag>.*` or `<backbone>-<hash>.*`. Ties go to the first path in sorted order.
    A folder is returned as such (`build_backbone` picks its file). Never enters the
    competition data or any folder with more than MAX_SUBFOLDERS subfolders.
    """
    wanted = _base_name(backbone)
    root_paths = [Path(r) for r in (default_weight_roots() if roots is None else roots)]
    candidates: list[tuple[int, tuple[str, ...], Path]] = []
    for root in root_paths:
        if not root.is_dir():
            continue
        # a root inside another is walked on its own (with its own depth), not twice
        skip = [r for r in root_paths if r != root and root in r.parents]
        for folder in _walk(root, SEARCH_DEPTH, skip):
            rank = _folder_rank(folder, root, wanted)
            if rank is not None:
                candidates.append((rank, folder.parts, folder))
            for file in _named_weight_files(folder, wanted):
                candidates.append((2, file.parts, file))
    return min(candidates)[2] if candidates else None


def _folder_rank(folder: Path, root: Path, wanted: str) -> int | None:
    """0: config.json names the architecture; 1: the folder or one above it (below `root`) is
    named after it; None: not a weights folder for it."""
    if weights_in_folder(folder, strict=False) is None:
        return None
    architecture = config_architecture(read_weights_config(folder))
    if architecture:
        return 0 if _base_name(architecture) == wanted else None
    named = [folder, *[p for p in folder.parents if p == root or root in p.parents]]
    return 1 if any(_base_name(p.name) == wanted for p in named) else None


def _named_weight_files(folder: Path, wanted: str) -> list[Path]:
    """Weight files in `folder` named after the backbone, unless a config.json there names
    another architecture."""
    try:
        files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    except OSError:
        return []
    named = [p for p in files if _file_names_backbone(p.name[: -len(p.suffix)], wanted)]
    if not named:
        return []
    architecture = config_architecture(read_weights_config(folder))
    return [] if architecture and _base_name(architecture) != wanted else named


def _file_names_backbone(stem: str, wanted: str) -> bool:
    """`<backbone>`, `<backbone>.<tag>` or `<backbone>-<hash>` (timm's release files), not
    `<backbone>_<more>`, which is usually another architecture (resnet50_gn)."""
    stem = stem.lower()
    return stem.replace("-", "_") == wanted or stem.startswith((wanted + ".", wanted + "-"))


def resolve_weights(weights_file: str | Path, backbone: str, init: str = "imagenet") -> str:
    """The ImageNet weights a notebook should pass to `build_backbone` as `weights_file`: a
    path as text, or "" for random init. Never downloads.

    - init "random": "" (whatever `weights_file` says).
    - `weights_file` given (init "imagenet", "auto"): that file or folder, resolved as
      `paths.find_inputs` does (any Kaggle mount layout); its config.json is checked against
      `backbone`.
    - `weights_file` empty, init "imagenet": `find_backbone_weights(backbone)`.
    - `weights_file` empty, init "auto": the same, or "" when none is attached.
    - any other init (e.g. "voco", whose encoder replaces the backbone's weights): "".

    Raises:
        FileNotFoundError: `weights_file` does not exist, or init "imagenet" and no weights
            for `backbone` are attached (the message says what to attach).
        ValueError: the weights found are for another architecture.
    """
    if init not in ("imagenet", "auto"):
        return ""
    if str(weights_file or ""):
        return str(resolve_weights_source(weights_file, backbone))
    found_path = find_backbone_weights(backbone)
    if found_path is not None:
        return str(found_path)
    if init == "auto":
        return ""
    roots = (
        ", ".join(str(r) for r in default_weight_roots()) or "nowhere: not on Kaggle, no inputs/"
    )
    raise FileNotFoundError(
        f"init='imagenet' but no ImageNet weights for {backbone} are attached (looked "
        f"{SEARCH_DEPTH} folders deep under {roots}; nothing is downloaded). Attach a Kaggle "
        f"Model or Dataset of timm's {_base_name(backbone)} weights in the Hugging Face layout "
        "(a folder with model.safetensors or pytorch_model.bin and config.json, e.g. "
        f"{_base_name(backbone)}.<tag>, as timm's save_for_hf writes it), or pass "
        "weights_file=<that folder or a weights file>; init='random' runs without ImageNet "
        "weights"
    )


def describe_weights(weights_file: str | Path | None) -> str:
    """One line for a notebook to print: where the backbone's weights come from."""
    if not weights_file:
        return "backbone weights: random init (no ImageNet weights)"
    path = Path(weights_file)
    folder = path if path.is_dir() else path.parent
    file = weights_in_folder(path, strict=False) if path.is_dir() else path
    architecture = config_architecture(read_weights_config(folder))
    what = f"timm {architecture} " if architecture else ""
    where = str(file) if file is not None else f"{path} (a file in it)"
    return f"backbone weights: ImageNet {what}from {where}"


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features `build_backbone`'s model returns. Not always timm's
    `num_features`: MobileNetV3 and others add a head convolution after pooling, whose width
    timm names `head_hidden_size` (576 vs 1024 for mobilenetv3_small_100)."""
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return int(width)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved by this project (or any plain tensor dict), loaded safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def input_normalisation(backbone: nn.Module, device: torch.device) -> tuple[Tensor, Tensor]:
    """The backbone's own mean/std (timm's pretrained_cfg), averaged over RGB for grey CT."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = float(np.mean(cfg.get("mean", (0.5,))))
    std = float(np.mean(cfg.get("std", (0.5,))))
    return torch.tensor(mean, device=device), torch.tensor(std, device=device)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on timm's gradient checkpointing (`model.set_grad_checkpointing(True)`): the
    backbone's blocks keep only their inputs in the forward pass and are run again during
    backward, trading compute for activation memory. Outputs and gradients are unchanged.

    It only acts where autograd records: under `torch.no_grad` (an EMA teacher, evaluation)
    nothing is saved and nothing recomputed. In training mode each checkpointed block's
    BatchNorm updates its running statistics twice per step (forward and recomputation), a
    known effect of `torch.utils.checkpoint`; the batch statistics, hence the gradients, are
    the same.

    Raises:
        ValueError: the model does not support it (it lacks `set_grad_checkpointing`, or timm
            refuses, as for dla, cspnet, vgg and other architectures).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or type(model).__name__
    setter = getattr(model, "set_grad_checkpointing", None)
    if not callable(setter):
        raise ValueError(f"{name} does not support gradient checkpointing (no timm backbone)")
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as error:
        raise ValueError(f"{name} does not support gradient checkpointing: {error}") from error

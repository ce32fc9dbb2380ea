"""Where data and outputs live on Kaggle, Colab and a local clone, decided in one place.

Notebooks take paths as papermill parameters; an empty string means "the usual place here".
Where the code runs is read from the environment, not guessed from a folder existing:
Kaggle sets `KAGGLE_KERNEL_RUN_TYPE` in every notebook kernel; Colab sets `COLAB_RELEASE_TAG`
(and so does Kaggle, whose image is built on Colab's, so Kaggle is checked first). Setting
`KAGGLE_UTILS_FAKE_ROOT` to a folder makes `/kaggle/...` and `/content/...` resolve under it,
so tests can run a notebook as if on Kaggle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

COMPETITION_NAME = "rsna-2023-abdominal-trauma-detection"
FAKE_ROOT_ENV = "KAGGLE_UTILS_FAKE_ROOT"
DRIVE_FOLDER = "voco2d"  # Colab: outputs go to MyDrive/voco2d/<step> when Drive is mounted

Environment = Literal["kaggle", "colab", "local"]


def system_root() -> Path:
    """`/`, or the folder in `KAGGLE_UTILS_FAKE_ROOT` that stands in for it (tests)."""
    return Path(os.environ.get(FAKE_ROOT_ENV) or "/")


def kaggle_input() -> Path:
    return system_root() / "kaggle" / "input"


def kaggle_working() -> Path:
    return system_root() / "kaggle" / "working"


def colab_content() -> Path:
    return system_root() / "content"


def environment() -> Environment:
    """ "kaggle", "colab" or "local", from the variables each platform sets."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") or "google.colab" in sys.modules:
        return "colab"
    return "local"


def on_kaggle() -> bool:
    return environment() == "kaggle"


def on_colab() -> bool:
    return environment() == "colab"


def kaggle_input_folders(name: str) -> Iterator[Path]:
    """Where Kaggle may mount an input called `name`: `/kaggle/input/<name>` (the classic
    layout), and `/kaggle/input/{competitions,datasets/<owner>,notebooks/<owner>}/<name>`
    (the layout of newer sessions). Only folders that exist."""
    root = kaggle_input()
    candidates = [root / name, root / "competitions" / name]
    for kind in ("datasets", "notebooks"):
        if (root / kind).is_dir():
            candidates += sorted((root / kind).glob(f"*/{name}"))
    yield from (p for p in candidates if p.is_dir())


def project_root() -> Path:
    """The checkout that holds `kaggle_utils/` and `notebooks/`: searched upwards from the
    working directory (papermill runs notebooks from anywhere), else this package's parent."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "kaggle_utils").is_dir() and (folder / "notebooks").is_dir():
            return folder
    return Path(__file__).resolve().parents[1]


def resolve_data_root(data_root: str | Path = "") -> Path:
    """The competition folder: `data_root` if given, else Kaggle's input (either layout), else
    `/content/rsna-2023-abdominal-trauma-detection` on Colab, else
    `inputs/rsna-2023-abdominal-trauma-detection` in the project.

    Raises:
        FileNotFoundError: nothing found, with what to do about it.
    """
    if str(data_root):
        path = Path(data_root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_root {path} does not exist or is not a folder")
        return path
    where = environment()
    candidates: list[Path] = []
    if where == "kaggle":
        candidates += list(kaggle_input_folders(COMPETITION_NAME)) or [
            kaggle_input() / COMPETITION_NAME
        ]
    elif where == "colab":
        candidates.append(colab_content() / COMPETITION_NAME)
    candidates.append(project_root() / "inputs" / COMPETITION_NAME)
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    hint = {
        "kaggle": "attach the competition data (Add Input) or pass data_root",
        "colab": f"download it to /content ({COMPETITION_NAME}) or pass data_root",
        "local": f"put the data in inputs/{COMPETITION_NAME} or pass data_root=<folder>",
    }[where]
    raise FileNotFoundError(
        f"no competition data found (tried {tried}): {hint}. For the synthetic demo, run "
        "`make demo` and use data_root=inputs/demo-rsna."
    )


def default_output_root() -> Path:
    """Where outputs go by default: /kaggle/working on Kaggle; on Colab MyDrive/voco2d when
    Drive is mounted (Colab sessions end without notice, Drive keeps the checkpoints), else
    /content/outputs; locally outputs/ in the project."""
    where = environment()
    if where == "kaggle":
        return kaggle_working()
    if where == "colab":
        drive = colab_content() / "drive" / "MyDrive"
        return drive / DRIVE_FOLDER if drive.is_dir() else colab_content() / "outputs"
    return project_root() / "outputs"


def resolve_output_dir(output_dir: str | Path = "", default_name: str = "run") -> Path:
    """`output_dir` if given, else `<default_output_root()>/<default_name>`. Created if
    missing."""
    path = (
        Path(output_dir).expanduser() if str(output_dir) else default_output_root() / default_name
    )
    path.mkdir(parents=True, exist_ok=True)
    return path

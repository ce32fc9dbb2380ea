"""Where data and outputs live on Kaggle, Colab and a local clone, decided in one place.

Notebooks take paths as papermill parameters; an empty string means "the usual place here".
"""

from __future__ import annotations

from pathlib import Path

COMPETITION_NAME = "rsna-2023-abdominal-trauma-detection"
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")


def on_kaggle() -> bool:
    return KAGGLE_WORKING.is_dir()


def project_root() -> Path:
    """The checkout that holds `kaggle_utils/` and `notebooks/`: searched upwards from the
    working directory (papermill runs notebooks from anywhere), else this package's parent."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "kaggle_utils").is_dir() and (folder / "notebooks").is_dir():
            return folder
    return Path(__file__).resolve().parents[1]


def resolve_data_root(data_root: str | Path = "") -> Path:
    """The competition folder: `data_root` if given, else Kaggle's input, else
    `inputs/rsna-2023-abdominal-trauma-detection` in the project.

    Raises:
        FileNotFoundError: nothing found, with what to do about it.
    """
    if str(data_root):
        path = Path(data_root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_root {path} does not exist or is not a folder")
        return path
    candidates = [KAGGLE_INPUT / COMPETITION_NAME, project_root() / "inputs" / COMPETITION_NAME]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no competition data found (tried {tried}). Pass data_root=<folder>, put the data in "
        f"inputs/{COMPETITION_NAME}, or run `make demo` and use data_root=inputs/demo-rsna."
    )


def resolve_output_dir(output_dir: str | Path = "", default_name: str = "run") -> Path:
    """`output_dir` if given, else /kaggle/working/<default_name> on Kaggle, else
    outputs/<default_name> in the project. Created if missing."""
    if str(output_dir):
        path = Path(output_dir).expanduser()
    elif on_kaggle():
        path = KAGGLE_WORKING / default_name
    else:
        path = project_root() / "outputs" / default_name
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Where data and outputs live on Kaggle, Colab and a local clone, decided in one place.

Notebooks take paths as papermill parameters; an empty string means "the usual place here".
Where the code runs is read from the environment, not guessed from a folder existing:
Kaggle sets `KAGGLE_KERNEL_RUN_TYPE` in every notebook kernel; Colab sets `COLAB_RELEASE_TAG`
(and so does Kaggle, whose image is built on Colab's, so Kaggle is checked first). Setting
`KAGGLE_UTILS_FAKE_ROOT` to a folder makes `/kaggle/...` and `/content/...` resolve under it,
so tests can run a notebook as if on Kaggle.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
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
    """Where Kaggle may mount an input called `name`: under each of `kaggle_input_roots` (the
    classic `/kaggle/input/<name>` and the newer sessions' competitions/, datasets/<owner>/,
    notebooks/<owner>/ and models/<owner>/). Only folders that exist."""
    yield from (root / name for root in kaggle_input_roots() if (root / name).is_dir())


def kaggle_input_roots() -> list[Path]:
    """Every folder Kaggle mounts inputs in: /kaggle/input itself (older sessions:
    /kaggle/input/<slug>), and in newer sessions /kaggle/input/competitions/,
    /kaggle/input/datasets/<owner>/, /kaggle/input/notebooks/<owner>/ (a kernel's output) and
    /kaggle/input/models/<owner>/. Only those that exist."""
    root = kaggle_input()
    roots = [root, root / "competitions"]
    for kind in ("datasets", "notebooks", "models"):
        if (root / kind).is_dir():
            roots += sorted(p for p in (root / kind).iterdir() if p.is_dir())
    return [r for r in roots if r.is_dir()]


def where_kaggle_looked() -> str:
    """For error messages: on Kaggle, the input mounts a path was looked for under; else ''."""
    if not on_kaggle():
        return ""
    roots = ", ".join(str(r) for r in kaggle_input_roots()[:6]) or str(kaggle_input())
    return f" (looked under every Kaggle input mount: {roots})"


def _under_kaggle_input(text: str) -> str | None:
    """The part of a path to look up under each of Kaggle's input roots: a relative path as it
    is; an absolute one under /kaggle/input without its mount layout (`datasets/<owner>/`,
    `notebooks/<owner>/`, `models/<owner>/`, `competitions/`); None for any other path."""
    if not os.path.isabs(text):
        return text
    for prefix in ("/kaggle/input/", f"{kaggle_input()}/"):
        if text.startswith(prefix):
            parts = Path(text[len(prefix) :]).parts
            if len(parts) > 2 and parts[0] in ("datasets", "notebooks", "models"):
                parts = parts[2:]
            elif len(parts) > 1 and parts[0] == "competitions":
                parts = parts[1:]
            return str(Path(*parts)) if parts else None
    return None


def _existing(pattern: str) -> list[Path]:
    if glob.has_magic(pattern):
        return sorted(Path(p) for p in glob.glob(pattern))
    return [Path(pattern)] if Path(pattern).exists() else []


def find_inputs(value: str | Path) -> list[Path]:
    """The existing paths a path parameter names: the path itself (a glob pattern: its matches,
    sorted); else, on Kaggle, the same path in every mount layout, so that
    `/kaggle/input/voco2d-cache-0/cache`, `/kaggle/input/notebooks/me/voco2d-cache-0/cache` and
    the relative `voco2d-cache-*/cache` all find a kernel output or dataset wherever this
    session mounted it. [] when nothing matches."""
    text = str(Path(str(value)).expanduser())
    direct = _existing(text)
    if direct or not on_kaggle():
        return direct
    rest = _under_kaggle_input(text)
    if rest is None:
        return []
    found: list[Path] = []
    for root in kaggle_input_roots():
        found += [p for p in _existing(str(root / rest)) if p not in found]
    return found


def find_input_holding(value: str | Path, relative: str) -> Path | None:
    """The first of `find_inputs(value)` that holds `relative` (a glob pattern, e.g.
    "fold*/model.json"), else None."""
    for path in find_inputs(value):
        if path.is_dir() and next(iter(path.glob(relative)), None) is not None:
            return path
    return None


def find_input(value: str | Path, parameter: str, kind: Literal["file", "dir"]) -> Path:
    """The one existing file or folder a path parameter names (`find_inputs`).

    Raises:
        FileNotFoundError: nothing of that kind matches (says where it looked), or a pattern
            matches several.
    """
    matches = [p for p in find_inputs(value) if (p.is_dir() if kind == "dir" else p.is_file())]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(map(str, matches[:5]))
        raise FileNotFoundError(f"{parameter}={value}: several matches ({listed}): name one")
    noun = "folder" if kind == "dir" else "file"
    raise FileNotFoundError(
        f"{parameter}={value} does not exist or is not a {noun}{where_kaggle_looked()}"
    )


def project_root() -> Path:
    """The checkout that holds `kaggle_utils/` and `notebooks/`: searched upwards from the
    working directory (papermill runs notebooks from anywhere), else this package's parent."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "kaggle_utils").is_dir() and (folder / "notebooks").is_dir():
            return folder
    return Path(__file__).resolve().parents[2]


def resolve_data_root(data_root: str | Path = "") -> Path:
    """The competition folder: `data_root` if given, else Kaggle's input (either layout), else
    `/content/rsna-2023-abdominal-trauma-detection` on Colab, else
    `inputs/rsna-2023-abdominal-trauma-detection` in the project.

    Raises:
        FileNotFoundError: nothing found, with what to do about it.
    """
    if str(data_root):
        return find_input(data_root, "data_root", "dir")
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
    if where == "colab":  # the CSVs are all Colab can hold; the DICOMs stay on Kaggle
        try:
            fetch_competition_csvs(candidates[0])
            return candidates[0]
        except RuntimeError as error:
            tried += f"; fetching the CSVs failed: {error}"
    hint = {
        "kaggle": "attach the competition data (Add Input) or pass data_root",
        "colab": f"download it to /content ({COMPETITION_NAME}) or pass data_root",
        "local": f"put the data in inputs/{COMPETITION_NAME} or pass data_root=<folder>",
    }[where]
    raise FileNotFoundError(
        f"no competition data found (tried {tried}): {hint}. For the synthetic demo, run "
        "`make demo` and use data_root=inputs/demo-rsna."
    )


COMPETITION_CSVS = (
    "train.csv",
    "train_series_meta.csv",
    "image_level_labels.csv",
    "test_series_meta.csv",
    "sample_submission.csv",
)
KAGGLE_CREDENTIALS = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")


def fetch_competition_csvs(
    folder: str | Path, files: Sequence[str] = COMPETITION_CSVS
) -> list[str]:
    """The competition's CSV files (not its 460 GB of DICOMs) into `folder`, those missing
    only, with the Kaggle CLI (`kaggle competitions download <competition> -f <file>`; Colab
    has it). Its credentials: KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY) from the
    environment, else from Colab's secrets (the key icon in the side bar), else
    ~/.kaggle/kaggle.json. Returns the files fetched.

    Raises:
        RuntimeError: no Kaggle CLI, or it failed (not signed in, the competition's rules not
            accepted): the message says which, and what to do.
    """
    folder = Path(folder)
    missing = [name for name in files if not (folder / name).is_file()]
    if not missing:
        return []
    if shutil.which("kaggle") is None:
        raise RuntimeError("the Kaggle CLI is not installed: pip install kaggle")
    environment = dict(os.environ)
    if not any(environment.get(name) for name in KAGGLE_CREDENTIALS):
        environment |= _colab_secrets(KAGGLE_CREDENTIALS)
    folder.mkdir(parents=True, exist_ok=True)
    for name in missing:
        command = ["kaggle", "competitions", "download", COMPETITION_NAME, "-f", name]
        done = subprocess.run(
            [*command, "-p", str(folder)], env=environment, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-500:]}. "
                "Sign in (a Colab secret KAGGLE_API_TOKEN from kaggle.com > Settings > API, or "
                "~/.kaggle/kaggle.json) and accept the competition's rules on its page"
            )
        archive = folder / f"{name}.zip"  # large files come zipped (the CLI's --unzip is new)
        if archive.is_file():
            with zipfile.ZipFile(archive) as zipped:
                zipped.extract(name, folder)
            archive.unlink()
    print(f"fetched {', '.join(missing)} into {folder} with the Kaggle CLI")
    return missing


def _colab_secrets(names: Sequence[str]) -> dict[str, str]:
    """The given Colab secrets that exist and this notebook may read."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return {}
    found = {}
    for name in names:
        try:
            value = userdata.get(name)
        except Exception:  # a secret missing, or access not granted: not fatal
            continue
        if value:
            found[name] = value
    return found


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

"""The package's layout is the pipeline: each stage sub-package imports only `common`, `metric`
and the stages it builds on, never a stage downstream of it, and never another module's
private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_utils"
# What each part may import besides itself. The arrows follow the data: the cache feeds
# pretraining and segmentation, segmentation's organ crops feed fine-tuning, fine-tuned models
# feed the submission and the experiments; the demo summary scores a submission.
ALLOWED = {
    "metric": set(),
    "common": {"metric"},
    "cache": {"common"},
    "pretrain": {"common", "cache"},
    "segmentation": {"common", "cache"},
    "finetune": {"common", "metric", "cache", "segmentation"},
    "submission": {"common", "metric", "cache", "segmentation", "finetune"},
    "experiments": {"common", "metric", "pretrain", "finetune"},
    "demo": {"common", "metric", "submission"},
    "bundle": {"common"},
}


def _part(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kaggle_utils"):
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("kaggle_utils.")]
    return found


def test_every_part_of_the_package_is_in_the_layout() -> None:
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert parts == set(ALLOWED)


def test_stages_import_only_what_they_build_on_and_no_private_names() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue
        own = relative.parts[0].removesuffix(".py")
        for module, names in _imports(path):
            if module == "kaggle_utils":  # `from kaggle_utils import x`: x is a part
                targets = [(n, []) for n in names]
            else:
                targets = [(_part(module), names)]
            for target, imported in targets:
                if target != own and target not in ALLOWED[own]:
                    problems.append(f"{relative}: imports {module} ({target} is not upstream)")
                private = [n for n in imported if n.startswith("_") and target != own]
                if private:
                    problems.append(f"{relative}: imports private {private} from {module}")
    assert not problems, "\n".join(problems)

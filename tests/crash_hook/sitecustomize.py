"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (the tests
put it there): reading a file named `segfault.dcm` then kills the process with SIGSEGV, the way a
native decoder crash does. It patches `kaggle_utils.cache.dicom.read_frames` (what `load_series`
reads each file with) when that module is first imported, so no production code knows about it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
from pathlib import Path
from typing import Any

CRASHING_FILE = "segfault.dcm"


class _PatchDicomOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "kaggle_utils.cache.dicom":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            read_frames = module.read_frames

            def crashing_read_frames(file: Any, *args: Any, **kwargs: Any) -> Any:
                if Path(file).name == CRASHING_FILE:
                    os.kill(os.getpid(), signal.SIGSEGV)
                return read_frames(file, *args, **kwargs)

            module.read_frames = crashing_read_frames

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PatchDicomOnImport())

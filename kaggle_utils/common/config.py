"""Run settings: the dataclasses every stage is configured with, written to and read from
config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

from kaggle_utils.common.io import write_text_atomic

_Config = TypeVar("_Config", bound="JsonConfig")


class JsonConfig:
    """Mixin for run-setting dataclasses: written to and read from a config.json (what
    `torchrun -m ... --config` reads)."""

    @classmethod
    def from_json(cls: type[_Config], path: str | Path) -> _Config:
        return cls(**json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> None:
        payload = dataclasses.asdict(self)  # type: ignore[call-overload]
        write_text_atomic(Path(path), json.dumps(payload, indent=1))

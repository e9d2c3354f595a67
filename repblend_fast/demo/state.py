"""What the demo's stages share: the run state (:class:`DemoRun`) and the stage clock that prints
one line per stage with the elapsed time."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repblend_fast.config import DistillConfig
from repblend_fast.demo.settings import DemoSettings


# ----------------------------------------------------------------------------- progress
class StageClock:
    """Prints one line per stage with the elapsed wall time, and records stage durations."""

    def __init__(self, total: int, log: Callable[[str], None] | None = None):
        self.t0 = time.perf_counter()
        self.total = total
        self.count = 0
        self.stages: list[dict[str, Any]] = []
        self.log = log if log is not None else _stderr

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _stamp(self) -> str:
        e = int(self.elapsed())
        return f"[demo {e // 60:d}:{e % 60:02d}]"

    def note(self, msg: str) -> None:
        self.log(f"{self._stamp()}   {msg}")

    def run(self, name: str, fn: Callable[[], Any], detail: str = "") -> Any:
        self.count += 1
        self.log(
            f"{self._stamp()} {self.count}/{self.total} {name}{': ' + detail if detail else ''}"
        )
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        self.stages.append({"stage": name, "seconds": round(dt, 3)})
        self.log(f"{self._stamp()} {self.count}/{self.total} {name} done in {dt:.1f} s")
        return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the run state
@dataclass
class DemoRun:
    """What the stages share: settings, configs, data, and what each stage produced."""

    settings: DemoSettings
    configs: dict[str, DistillConfig]
    out: Path
    clock: StageClock
    cache_dir: str | os.PathLike | None = None
    progress: bool = True
    train: Any = None
    test: Any = None
    enc: Any = None
    sizes: dict[str, int] = field(default_factory=dict)
    ftrain: Any = None
    ftest: Any = None
    experts_meta: dict[str, Any] = field(default_factory=dict)
    expert_dirs: dict[str, Path] = field(default_factory=dict)
    distilled: dict[str, Any] = field(default_factory=dict)
    dist_meta: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)
    # name -> (image features, texts, target or None, lr_img, lr_txt) of each evaluated set
    sets: dict[str, tuple] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.sizes["repblend"]

"""The engine's speed presets and memory modes as names: torch-free, so that settings and the
CLI can check them without loading the engine (``worker.acceleration`` applies them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "MEMORY_OFFLOADS",
    "MEMORY_STORAGES",
    "PRESETS",
    "AccelerationPreset",
    "MemoryMode",
    "parse_memory_mode",
]

AccelerationPreset = Literal["none", "compile", "fp8", "cache", "fp8-cache"]
PRESETS: tuple[str, ...] = get_args(AccelerationPreset)

Storage = Literal["bf16", "fp8-storage", "nf4"]
Offload = Literal["resident", "model-offload", "group-offload"]
MEMORY_STORAGES: tuple[str, ...] = ("fp8-storage", "nf4")
MEMORY_OFFLOADS: tuple[str, ...] = ("model-offload", "group-offload")


@dataclass(frozen=True)
class MemoryMode:
    storage: Storage = "bf16"
    offload: Offload = "resident"

    def __str__(self) -> str:
        parts = [p for p in (self.storage, self.offload) if p not in ("bf16", "resident")]
        return "+".join(parts) or "resident"

    @property
    def loads_on_cpu(self) -> bool:
        """Weights read from disk go to CPU memory first: the offload hooks move them as they
        are needed, and fp8 storage casts them before they move (in bf16 they may not fit)."""
        return self.offload != "resident" or self.storage == "fp8-storage"


def parse_memory_mode(text: str) -> MemoryMode:
    """``"resident"``, ``"fp8-storage"``, ``"model-offload"``, ``"nf4+group-offload"``, ...;
    raises ``ValueError`` saying what is allowed."""
    allowed = (
        "resident, or one storage (fp8-storage, nf4) and/or one offload (model-offload, "
        "group-offload) joined by '+', e.g. fp8-storage+model-offload"
    )
    storage: str = "bf16"
    offload: str = "resident"
    parts = [part.strip() for part in text.strip().lower().split("+")]
    if parts == ["resident"]:
        return MemoryMode()
    for part in parts:
        if part in MEMORY_STORAGES and storage == "bf16":
            storage = part
        elif part in MEMORY_OFFLOADS and offload == "resident":
            offload = part
        else:
            raise ValueError(f"memory mode {text!r} is not valid; allowed: {allowed}")
    return MemoryMode(storage=storage, offload=offload)  # type: ignore[arg-type]

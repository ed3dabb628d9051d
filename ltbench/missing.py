"""Why a result is missing (N/A): classes a detector cannot score, and detectors that give no anomaly maps.

Shared by the printed summary (`ltbench.evaluation`) and the leaderboard, which must not import
numpy or torch. DESIGN.md, "The detector contract": nothing is ever imputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MISSING = "N/A"  # how a null value is printed, as the paper does
GROUPS = ("all", "high", "low")
NO_MAPS = "the detector gives no anomaly maps (detection only)"


def unscored_text(unscored: Mapping[str, str]) -> str:
    """The classes a detector cannot score, with their reasons, as one line: "a (reason); b (reason)"."""
    return "; ".join(f"{name} ({reason})" for name, reason in unscored.items())


def groups_holding(per_class: Mapping[str, Mapping[str, Any]], classes: Iterable[str]) -> list[str]:
    """The groups ("All", "High", "Low") whose mean includes one of `classes` (per_class gives each class's group)."""
    groups = {"all"} | {per_class[name]["group"] for name in classes if name in per_class}
    return [group.capitalize() for group in GROUPS if group in groups]

"""Split configuration names ("exp100", "step200-reverse", "exp100-seed3"): the one place that makes and reads them.

No numpy: the leaderboard reads recipes and seeds from the split names of finished runs.
"""

from __future__ import annotations

import re

from ltbench.errors import SplitError

PROFILES = ("exp", "step")
LIST_PROFILE = "list"  # a manifest pinned from a given list of images (ltbench.split_lists), not drawn by a recipe
_CONFIG_PATTERN = re.compile(r"(exp|step)(\d+(?:\.\d+)?)(-reverse)?(?:-seed(\d+))?")


def format_beta(beta: float) -> str:
    """`100.0` -> "100", `2.5` -> "2.5" (as used in configuration names)."""
    return str(int(beta)) if float(beta).is_integer() else repr(float(beta))


def config_name(profile: str, beta: float, reverse: bool = False, seed: int = 0) -> str:
    """Configuration name: "exp100", "step200-reverse", "exp100-seed3"."""
    return f"{profile}{format_beta(beta)}{'-reverse' if reverse else ''}{f'-seed{seed}' if seed else ''}"


def parse_config(config: str) -> tuple[str, float, bool, int]:
    """Inverse of `config_name`: (profile, beta, reverse, seed); raises `SplitError` if malformed."""
    match = _CONFIG_PATTERN.fullmatch(config)
    if not match:
        raise SplitError(f"configuration {config!r} is malformed: use <exp|step><beta>[-reverse][-seed<n>], "
                         f"e.g. exp100 or step200-reverse")
    profile, beta, reverse, seed = match.groups()
    return profile, float(beta), reverse is not None, int(seed or 0)

"""Progress bars for long work (calibration, measurement), on stderr."""

from __future__ import annotations

import os
from typing import Any


def progress(total: int, desc: str, unit: str = "it") -> Any:
    """A tqdm bar; ``SHARDSERVE_PROGRESS=0`` switches bars off (logs, CI)."""
    from tqdm import tqdm

    disable = os.environ.get("SHARDSERVE_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable,
                dynamic_ncols=True)

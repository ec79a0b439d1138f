"""What every benchmark script writes: the device line and the JSON result (stdout and a file)."""

from __future__ import annotations

import json
import os
import platform as host
from typing import Any, Optional


def cpu_description() -> str:
    """``CPU (<processor>, <n> cores)`` of this machine."""
    return f"CPU ({host.processor() or host.machine()}, {os.cpu_count()} cores)"


def write_result(result: dict[str, Any], path: Optional[str]) -> None:
    """Print ``result`` as indented JSON and, with ``path``, write it there (folders created)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")

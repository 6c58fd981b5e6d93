"""What tools/convert_to_hf.py and tools/convert_from_hf.py share around a conversion: the
--dtype choices, and the run itself (timed, memory stamped, errors as one-line messages).
Imports no torch at module level, so the tools can build their argument parsers first."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, Optional

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: Optional[str]):
    """The torch dtype of a --dtype choice, or None (keep the stored dtype)."""
    import torch

    return getattr(torch, DTYPES[name]) if name else None


def run_conversion(convert: Callable[[], dict]) -> int:
    """Run `convert` (which returns its summary) and print the summary with `seconds`,
    `peak_rss_gib` and `rss_after_imports_gib` as the last stdout line: exit 0. A conversion
    or config error is printed as `conversion error:` lines on stderr instead: exit 2."""
    from megatron_mm.runtime import compat

    compat.before_megatron_import()
    from megatron_mm.config import ConfigError
    from megatron_mm.conversion.dcp import ConversionError
    from megatron_mm.conversion.progress import peak_rss_gib

    start = time.time()
    baseline = peak_rss_gib()  # after the tool's imports
    try:
        summary = convert()
    except (ConversionError, ConfigError) as err:
        print(f"conversion error: {err}".replace("\n", "\nconversion error: "), file=sys.stderr)
        return 2
    summary["seconds"] = round(time.time() - start, 2)
    summary["peak_rss_gib"] = round(peak_rss_gib(), 3)
    summary["rss_after_imports_gib"] = round(baseline, 3)
    print(json.dumps(summary))
    return 0

"""Drop malformed or degenerate samples; a query keeps its group only if all C responses survive."""
from __future__ import annotations

import re

from sami.config import FilterConfig

REASONS = ("empty", "format_leak", "malformed", "identical")


def reject_reason(responses: list[str], cfg: FilterConfig) -> str:
    """'' to keep the group, else the first reason it fails (counted per reason by the caller)."""
    for text in responses:
        if len(text.strip()) < max(cfg.min_response_chars, 1):
            return "empty"
        if any(pattern in text for pattern in cfg.leak_patterns):
            return "format_leak"
        if cfg.response_pattern is not None and not re.fullmatch(cfg.response_pattern, text.strip()):
            return "malformed"
    if cfg.drop_identical and len({t.strip() for t in responses}) < len(responses):
        return "identical"
    return ""

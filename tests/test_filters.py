"""The sample filters: a group survives only if all its responses do; the first failing reason is counted."""
import pytest

from sami.config import ConfigError, FilterConfig, load_config
from sami.filters import reject_reason


@pytest.mark.parametrize("responses, expected", [
    (["The river is long.", "It is short."], ""),
    (["The river is long.", "  "], "empty"),
    (["[insert response here]", "It is short."], "format_leak"),
    (["The river is long.", "The river is long. Human: and"], "format_leak"),
    (["The river is long.", "it is short"], "malformed"),  # no final full stop
    (["The river is long.", "The river is long."], "identical"),
])
def test_reject_reason(responses, expected):
    assert reject_reason(responses, FilterConfig(response_pattern=r"[^.!?]+[.!]")) == expected


def test_without_a_pattern_any_format_passes_and_a_bad_pattern_is_a_config_error():
    assert reject_reason(["it is short", "no stop here"], FilterConfig()) == ""
    with pytest.raises(ConfigError, match=r"filters.response_pattern: not a valid regular expression"):
        load_config(None, ["filters.response_pattern=(unclosed"])

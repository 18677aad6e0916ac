"""Settings: env and flags, validation at start, and the README table they generate."""

from __future__ import annotations

import pytest

from server.settings import Settings, parse

pytestmark = pytest.mark.unit
LABELS = ("angry", "happy")


def test_settings_come_from_env_and_flags_win():
    env = {
        "VOXAFFECT_PORT": "6001",
        "VOXAFFECT_API_TOKENS": "token-one-0123456, token-two-0123456",
        "VOXAFFECT_CPU_FALLBACK": "no",
        "VOXAFFECT_WINDOW_S": "3",
        "VOXAFFECT_TELEPHONY_TRACKS": "customer,agent",
    }
    s = parse(["--port", "7000", "--hop-s", "0.5"], env)
    assert (s.port, s.api_tokens, s.cpu_fallback, s.window_s, s.hop_s) == (
        7000,
        ("token-one-0123456", "token-two-0123456"),
        False,
        3.0,
        0.5,
    )
    assert s.telephony_tracks == ("customer", "agent")
    assert s.pipeline_config().window_s == 3.0
    assert "token-one" not in str(s.public()) and s.public()["api_tokens"] == 2


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"VOXAFFECT_PORT": "eighty"}, "port must be a int"),
        ({"VOXAFFECT_PORT": "0"}, "port"),
        ({"VOXAFFECT_HOP_S": "5"}, "hop_s"),
        ({"VOXAFFECT_TELEPHONY_TRACKS": "boss"}, "boss"),
        ({"VOXAFFECT_CPU_FALLBACK": "maybe"}, "cpu_fallback"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_value(env, match):
    with pytest.raises(ValueError, match=match):
        parse([], env)


def test_default_settings_are_valid():
    assert Settings().auth_required is False


def test_the_readme_settings_table_is_the_one_settings_make():
    from pathlib import Path

    from server.settings import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it with: python -m server.settings README.md"

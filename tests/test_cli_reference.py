"""The CLI reference in docs/ is generated from the parsers; it must match what `--help` prints now."""

from __future__ import annotations

from clipshot.cli import main, render_cli_markdown
from tests.conftest import REPO


def test_cli_reference_is_current():
    committed = (REPO / "docs" / "reference" / "cli.md").read_text()
    assert committed == render_cli_markdown(), "regenerate: python -m clipshot.cli --markdown > docs/reference/cli.md"


def test_every_command_is_documented():
    text = render_cli_markdown()
    for command in ("clipshot serve", "clipshot train fewshot", "clipshot train generic", "clipshot eval",
                    "clipshot info", "clipshot predict"):
        assert f"## `{command}`" in text


def test_info_on_offline_backbone(capsys):
    assert main(["info", "--backbone", "imagenet:efficientnet-lite0"]) == 0
    out = capsys.readouterr().out
    assert "memory only" in out and "image size:    320" in out


def test_unknown_backbone_is_a_one_line_error(capsys):
    assert main(["info", "--backbone", "open_clip:NoSuchNet-1:laion"]) == 2
    assert "unknown open_clip architecture" in capsys.readouterr().err

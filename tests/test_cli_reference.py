"""The CLI reference in docs/ is generated from the parsers; it must match what `--help` prints now."""

from __future__ import annotations

from app.cli.main import main
from app.cli.reference import render_cli_markdown
from tests.conftest import REPO


def test_cli_reference_is_current():
    committed = (REPO / "docs" / "reference" / "cli.md").read_text()
    assert committed == render_cli_markdown(), "regenerate: python -m app.cli.reference > docs/reference/cli.md"


def test_cli_reference_does_not_depend_on_the_environment(monkeypatch):
    """Defaults read from CLIPSHOT_* are resolved at run time, so generating the doc with them set changes nothing."""
    before = render_cli_markdown()
    monkeypatch.setenv("CLIPSHOT_BACKBONE", "test:tiny-clip")
    monkeypatch.setenv("CLIPSHOT_STORE", "/elsewhere")
    assert render_cli_markdown() == before


def test_every_command_is_documented():
    text = render_cli_markdown()
    for command in ("clipshot serve", "clipshot train fewshot", "clipshot train generic", "clipshot eval",
                    "clipshot info", "clipshot predict"):
        assert f"## `{command}`" in text


def test_info_on_offline_backbone(capsys):
    assert main(["info", "--backbone", "imagenet:efficientnet-lite0"]) == 0
    captured = capsys.readouterr()
    assert "memory only" in captured.out and "image size:    320" in captured.out
    assert "Loaded pretrained weights" not in captured.out + captured.err  # the package's own print is muted


def test_unknown_backbone_is_a_one_line_error(capsys):
    assert main(["info", "--backbone", "open_clip:NoSuchNet-1:laion"]) == 2
    assert "unknown open_clip architecture" in capsys.readouterr().err

"""The console script as a user meets it: instant help, a version, and one clear line for every mistake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from app.cli import common
from app.cli.main import main
from tests.conftest import REPO

HEAVY = ("torch", "open_clip", "peft", "fastapi", "pydantic", "uvicorn", "PIL", "numpy")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, reporting which heavy packages the call imported."""
    code = ("import sys; from app.cli.main import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
            "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["serve", "--help"], ["train", "fewshot", "--help"],
                                  ["info", "--help"], ["sevre"]])
def test_help_version_and_typos_import_nothing_heavy(args):
    """`clipshot --help` took ~10 s because every command imported torch + peft up front (timed in
    benchmarks/cli_startup.py); the behaviour that keeps it fast is that nothing heavy is imported at all."""
    result = run_cli(*args)
    assert "IMPORTED []" in result.stderr, result.stderr
    assert result.returncode == (2 if args == ["sevre"] else 0)


def test_version_and_typo_suggestion():
    assert run_cli("--version").stdout.strip().startswith("clipshot 0.")
    typo = run_cli("sevre")
    assert "unknown command 'sevre'; did you mean 'serve'?" in typo.stderr


def test_pinned_constants_match_the_core():
    """The parsers repeat two core constants so that --help need not import torch; they must not drift."""
    from clipshot.backbone import DEFAULT_BACKBONE, EFFICIENTNET_LITE0, PRECISION_CHOICES

    assert (common.DEFAULT_BACKBONE, common.EFFICIENTNET_LITE0) == (DEFAULT_BACKBONE, EFFICIENTNET_LITE0)
    assert common.PRECISION_CHOICES == PRECISION_CHOICES


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["info"], ["eval", "--data", "x", "--out", "y"]])
def test_cuda_without_cuda_is_one_line(capsys, command):
    assert main([*command, "--device", "cuda"]) == 2
    line = one_error_line(capsys)
    assert "CUDA is not available" in line and "--device cpu" in line


def test_directory_given_as_checkpoint(capsys, tmp_path):
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    assert main(["info", "--backbone", f"open_clip:ViT-B-16:{tmp_path}"]) == 2
    line = one_error_line(capsys)
    assert "is a directory" in line and "open_clip_model.safetensors" in line and "does not exist" not in line


def test_corrupt_checkpoint_is_not_called_a_download_problem(capsys, tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(os.urandom(4096))
    assert main(["info", "--backbone", f"open_clip:ViT-B-16:{bad}"]) == 2
    line = one_error_line(capsys)
    assert "corrupt or truncated" in line and "download" not in line.lower()


def test_unknown_architecture_suggests_real_ones(capsys):
    assert main(["info", "--backbone", "open_clip:ViT-B-61:laion400m_e32"]) == 2
    line = one_error_line(capsys)
    assert "did you mean ViT-B-16" in line  # the old message said `similar: []`


def test_unknown_pretrained_tag_lists_the_real_tags(capsys):
    assert main(["info", "--backbone", "open_clip:ViT-B-16:laion_nope"]) == 2
    line = one_error_line(capsys)
    assert "laion400m_e32" in line and "openai" in line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # released on exit: nothing listens there


def test_unreachable_hub_fails_at_once_with_the_offline_advice(capsys, monkeypatch, tmp_path):
    """Old behaviour: ~58 s of retry warnings, then the advice. The probe sees the closed port and huggingface_hub
    runs in offline mode (cache only), so the advice comes at once and alone."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert main(["info", "--backbone", "open_clip:ViT-B-16-plus-240:laion400m_e32"]) == 2
    line = one_error_line(capsys)
    assert "cannot be reached" in line and "/path/to/open_clip_model.safetensors" in line


def test_hub_probe_answers_false_for_a_closed_port():
    from clipshot.backbone.hub import hub_reachable

    assert hub_reachable(f"http://127.0.0.1:{closed_port()}", timeout=2.0) is False


def test_info_and_eval_honour_clipshot_backbone(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPSHOT_BACKBONE", "test:tiny-clip")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backbone:      test:tiny-clip" in out
    from clipshot.memory_branch import native_bf16  # info says what memory scoring runs in on this machine

    assert f"memory scoring {'bf16' if native_bf16('cpu') else 'fp32'} with memory_precision=auto" in out
    monkeypatch.setenv("CLIPSHOT_BACKBONE", "open_clip:NoSuchNet-7:random")
    assert main(["eval", "--data", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert "NoSuchNet-7" in one_error_line(capsys)  # eval loaded the variable's backbone, not its default


def test_flag_beats_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("CLIPSHOT_BACKBONE", "open_clip:NoSuchNet-7:random")
    assert main(["info", "--backbone", "test:tiny-clip"]) == 0
    assert "test:tiny-clip" in capsys.readouterr().out

"""Run the real `patchbench` entry point in-process, as a user's shell would, and capture what it prints."""

import sys

from ssl_patchbench.cli.main import main


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``patchbench ARGS``."""
    monkeypatch.setattr(sys, "argv", ["patchbench", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def model_args(checkpoint, data_dir, model: str = "tiny_cifar") -> list[str]:
    """The options every test run of a checkpoint on the CIFAR-10 subset shares (default: the tiny mock model)."""
    return ["--model", model, "--checkpoint", str(checkpoint), "--dataset", "cifar10", "--data-dir", str(data_dir)]

"""What a person sees: progress on and off a terminal, warnings, help, the results listing, CPU thread counts."""

import io
import logging
import os
import re
import subprocess
import sys

import click
import pytest
import torch
from rich.console import Console

from ssl_patchbench.cli import common
from ssl_patchbench.cli.main import cli
from ssl_patchbench.cli.report import _results_table
from ssl_patchbench.core import devices

from .clitools import run_cli
from .factories import record


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_progress_is_periodic_plain_lines(capsys):
    clock = Clock()
    with common.progress(interval=10.0, clock=clock) as factory:
        advance = factory("train 16 random", 1000, 16000)
        for _ in range(10):  # 100 images every 4 s: a line after the first batch, then one per 10 s, then done
            clock.now += 4.0
            advance(100, 1600)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "train 16 random: 100/1,000 images (10%), 25 img/s 400 patch/s, 0:00:36 left"
    assert [re.search(r": ([\d,]+)/", line).group(1) for line in lines[1:-1]] == ["400", "700"]  # 12 s, 24 s
    assert lines[-1] == "train 16 random: 1,000 images in 0:00:40 (25 img/s 400 patch/s)"


def test_an_extraction_with_nothing_left_says_so_and_a_finished_one_prints_one_line(capsys):
    with common.progress() as factory:
        factory("test central", 0, 0)
        advance = factory("train central", 5, 5)
        advance(5, 5)
        advance(0, 0)  # a late call after the end prints nothing more
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "test central: reused cached features"
    assert len(lines) == 2 and lines[1].startswith("train central: 5 images in ")


def test_on_a_terminal_the_bar_shows_a_rate_from_the_first_batch_and_leaves_one_line(monkeypatch):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(common, "stderr", console)
    clock = Clock()
    with common.progress(clock=clock) as factory:
        advance = factory("train central", 200, 200)
        clock.now += 2.0
        advance(100, 100)
        task = factory.__self__.bar.tasks[0]
        assert task.fields["status"] == "50 img/s 50 patch/s" and task.fields["eta"] == "0:00:02"
        clock.now += 2.0
        advance(100, 100)
        assert not factory.__self__.bar.tasks  # the finished bar is gone...
    text = console.file.getvalue()
    assert text.count("train central: 200 images in 0:00:04") == 1  # ...and its line printed once


def test_warnings_print_through_the_console_above_a_live_bar(capsys):
    logger = logging.getLogger("ssl_patchbench.test_display")
    handler = common.ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    try:
        logger.warning("k=200 exceeds the 100 train rows")
    finally:
        logger.removeHandler(handler)
    assert "WARNING ssl_patchbench.test_display: k=200 exceeds the 100 train rows" in capsys.readouterr().err


@pytest.mark.parametrize("args", [(), ("viz",), ("zoo",)])
def test_a_group_alone_prints_its_help_and_exits_0(capsys, monkeypatch, args):
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0 and "Usage:" in out and "Commands:" in out and "error" not in err


def _commands(group: click.Group, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_option_has_help_and_every_summary_is_a_whole_sentence():
    options = [(path, p) for path, c in _commands(cli) for p in c.params if isinstance(p, click.Option)]
    assert [(path, p.opts[0]) for path, p in options if not p.help] == []
    groups = [cli, cli.commands["viz"], cli.commands["zoo"]]
    for group in groups:
        for command in group.commands.values():
            summary = command.get_short_help_str(limit=60)
            assert not summary.endswith("...") and summary.endswith("."), summary


def test_checkpoint_options_say_path_or_url():
    helps = [p.help for _, c in _commands(cli) for p in c.params if p.opts[0] == "--checkpoint" and p.help]
    assert helps and all("URL" in h or "sha256" in h for h in helps)


@pytest.mark.slow
def test_zoo_list_imports_no_deep_learning_framework():
    code = (
        "import sys; from ssl_patchbench.cli.main import main; sys.argv = ['patchbench', 'zoo', 'list']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "resnet18_cifar" in out.stdout and out.stderr.strip().splitlines()[-1] == "[]"


def _listing(records, width=120) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(_results_table(records))
    return console.export_text().splitlines()


def test_results_listing_is_one_line_per_record_at_120_columns():
    sliding = {"mode": "sliding", "n": 1, "size": 16, "stride": 4, "scale": [0.08, 1.0]}
    rrc = {"mode": "random", "n": 256, "scale": [0.08, 1.0], "size": None}
    full = {"n_train": 50_000, "n_test": 10_000, "data": {}}
    records = [
        record(**full, metrics={"knn@20": {"top1": 78.611111111111}, "linear": {"top1": 80.0}}),
        record(**full, representation="25", patches=sliding, aggregation="gridpool(3,2)", space="projection"),
        record(representation="256", patches=rrc, reused_features=True),
    ]
    lines = _listing(records)
    assert all(len(line) <= 120 for line in lines) and "…" not in "".join(lines)
    rows = [line for line in lines if line.startswith("2026-01-01 00:00 ")]  # the full date opens every row
    assert len(rows) == 3
    assert "78.61" in rows[0] and "78.611" not in rows[0]
    assert " projection " in rows[1] and " embedding " in rows[0]
    assert "cifar10 50k/10k " in rows[0] and "cifar10 200/100†" in rows[2]  # subset marked
    assert "256 × 0.08-1 ↺" in rows[2] and "1 rerun(s) on reused cached features" in lines[0]


def test_available_cores_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch, tmp_path):
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(devices, "CGROUP_CPU_MAX", quota)
    assert devices.available_cores() == affinity  # no cgroup file: the affinity mask
    quota.write_text("max 100000\n")
    assert devices.available_cores() == affinity
    quota.write_text("150000 100000\n")  # 1.5 cores: one whole core
    assert devices.available_cores() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota.write_text("800000 100000\n")
    assert devices.available_cores() == 4


def test_a_cpu_run_sizes_torch_threads_to_the_available_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "available_cores", lambda: 1)
    try:
        assert devices.use_available_cores() == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
        torch.set_num_threads(2)
        assert devices.use_available_cores() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

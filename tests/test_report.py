"""The HTML report: self-contained, and rendered by a real browser as a person would see it."""

import base64
import json
import re
import shutil
import subprocess
import sys

import pytest

from ssl_patchbench.analysis.report import Section, records_sections, render_html
from ssl_patchbench.cli.main import main
from ssl_patchbench.models.checkpoints import sha256_file

from .factories import scale_record

PNG = b"\x89PNG\r\n\x1a\n"


def _records_file(tmp_path, sha="ab" * 32):
    path = tmp_path / "results.jsonl"
    rows = [scale_record([0.08, 1.0], rep, acc) for rep, acc in (("central", 60.0), ("1", 45.0), ("16", 63.5))]
    path.write_text("".join(json.dumps({**r, "model": "tiny_cifar", "checkpoint_sha256": sha}) + "\n" for r in rows))
    return path


def _self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r'(src|href)="(?!data:)', page), "every asset must be inline"
    assert "<script" not in page and "http://" not in page and "https://" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert images and all(base64.b64decode(data)[:8] == PNG for data in images)


def test_render_html_escapes_and_inlines(tmp_path):
    page = render_html("a <b> & c", [Section("s", ["x < y"], figures=[("fig", PNG + b"rest")])])
    assert "a &lt;b&gt; &amp; c" in page and "x &lt; y" in page
    _self_contained(page)


def test_records_sections_hold_a_table_and_the_scale_figure(tmp_path):
    records = [json.loads(line) for line in _records_file(tmp_path).read_text().splitlines()]
    sections = records_sections(records)
    assert len(sections) == 2 and len(sections[0].tables[0][1]) == 3
    assert sections[1].figures[0][1][:8] == PNG


def test_report_of_mixed_records_leaves_the_odd_ones_out_with_a_note(tmp_path):
    records = [json.loads(line) for line in _records_file(tmp_path).read_text().splitlines()]
    odd = {**records[0], "representation": "4", "checkpoint_sha256": "cd" * 32}  # same scale, other weights
    sections = records_sections([*records, odd])
    frame = sections[0].tables[0][1]
    assert frame.checkpoint.tolist() == ["abababab"] * 3 + ["cdcdcdcd"]  # the plain table names the weights
    figure = sections[1]
    assert "4" not in set(figure.tables[0][1].representation)
    assert any("left out: checkpoint cdcdcdcd" in p for p in figure.paragraphs)


@pytest.fixture(scope="module")
def report_page(tiny_checkpoint, cifar_dir, tmp_path_factory):
    """One report of the tiny model and its records, shared by the tests that read or render it."""
    from click.testing import CliRunner

    from ssl_patchbench.cli.main import cli

    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report.html"
    records = _records_file(tmp, sha256_file(tiny_checkpoint))
    args = ["report", "--results", str(records), "--model", "tiny_cifar", "--checkpoint", str(tiny_checkpoint),
            "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--per-class", "1", "--device", "cpu",
            "--home", str(tmp / "home"), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_report_for_a_model_and_its_records(report_page):
    page = report_page.read_text()
    _self_contained(page)
    for heading in ("Results records", "Convergence", "Nearest patches", "heatmaps"):
        assert heading in page
    assert len(re.findall(r"<img ", page)) == 5


def test_report_without_anything_is_a_user_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["patchbench", "report", "--results", str(tmp_path / "none.jsonl")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "nothing to report" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package `chromium`) is not installed")
def test_report_renders_in_headless_chromium(report_page, tmp_path):
    from PIL import Image

    page = report_page
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600"]  # fmt: skip
    subprocess.run([CHROMIUM, *flags, page.as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram), "the screenshot is blank"
    assert image.getextrema()[0] < 80, "no dark text or figure pixels drawn"

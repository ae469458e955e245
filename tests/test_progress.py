"""common/progress.py: a few whole lines (no carriage returns) when not writing to a terminal; the CLIs use it."""

from __future__ import annotations

import io

import pytest

from common import progress
from common.progress import LineProgress, progress_bar


def _lines(buf: io.StringIO) -> list[str]:
    text = buf.getvalue()
    assert "\r" not in text
    return text.splitlines()


@pytest.mark.parametrize("total", [1000, None])
def test_not_a_tty_gives_a_few_lines(total):
    buf = io.StringIO()
    bar = progress_bar(total=total, desc="scanning DICOM files", unit="file", file=buf)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    bar.close()  # idempotent: the CLIs close in `finally` and on stage change
    lines = _lines(buf)
    assert lines[0].startswith("scanning DICOM files: 0")
    assert 2 <= len(lines) <= 12, lines
    assert "1000" in lines[-1] and "done in" in lines[-1]
    assert all(line.startswith("scanning DICOM files: ") for line in lines)
    if total:  # start, 10 %, ..., 90 %, final
        assert len(lines) == 11 and "(50%)" in lines[5]


def test_total_set_after_creation():
    # simulations/cli.py: the bar starts without a total; every callback sets it, then updates to `done`.
    buf = io.StringIO()
    bar = progress_bar(total=None, desc="simulate data", unit="patient", file=buf)
    for done in range(1, 191):
        bar.total = 190
        bar.update(done - bar.n)
    bar.close()
    lines = _lines(buf)
    assert lines[0] == "simulate data: 0 patient"
    assert len(lines) <= 12
    assert lines[-1].startswith("simulate data: 190/190 patient (100%), done in")


def test_unknown_total_reports_every_interval(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    buf = io.StringIO()
    bar = LineProgress(None, "scan", "file", buf, interval=30.0)
    for _ in range(100):  # 100 updates over 99 s: one line per 30 s
        bar.update(1)
        now[0] += 1.0
    bar.close()
    assert len(_lines(buf)) == 1 + 3 + 1


def test_a_tty_gets_tqdm():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    bar = progress_bar(total=3, desc="x", unit="step", file=Tty())
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()


def test_client_prepare_bars_print_lines():
    # The callback `client prepare` hands to common.prepare: a scan stage without a total, then the stacks stage
    # starting at the reused count.
    from client.cli import _progress_bar

    buf = io.StringIO()
    update, close = _progress_bar(file=buf)
    for i in range(1, 1554):
        update("scan", i, 0)
    update("stacks", 150, 190)
    for done in range(151, 191):
        update("stacks", done, 190)
    close()
    lines = _lines(buf)
    assert len(lines) <= 16, lines
    scan = [line for line in lines if line.startswith("scanning DICOM files: ")]
    stacks = [line for line in lines if line.startswith("building stacks: ")]
    assert len(scan) + len(stacks) == len(lines)
    assert "1553 file" in scan[-1] and "done in" in scan[-1]
    assert stacks[-1].startswith("building stacks: 190/190 patient")


def test_simulate_data_prints_lines(monkeypatch, capsys, tmp_path):
    # `simulate data` with the generator stubbed: stderr is captured (not a tty), so lines, not tqdm.
    import argparse

    import simulations.datagen
    from simulations.cli import _data_run

    def generate(out, *, progress, **kwargs):
        for done in range(1, 1001):
            progress(done, 1000)
        return []

    monkeypatch.setattr(simulations.datagen, "generate", generate)
    args = argparse.Namespace(out=tmp_path, sites=None, patients=None, seed=0, small=True, public=False, workers=1,
                              difficulty=1.0)  # fmt: skip
    assert _data_run(args) == 0
    lines = _lines(io.StringIO(capsys.readouterr().err))
    assert len(lines) <= 12 and lines[-1].startswith("simulate data: 1000/1000 patient"), lines


def test_pretrain_bar_prints_lines(capsys):
    from simulations import train_cli

    with train_cli.step_bar("pretraining") as progress:
        for step in range(1, 51):
            progress(step, 50)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("pretraining: 50/50 step")

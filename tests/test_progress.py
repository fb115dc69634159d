"""Progress on a terminal and in a file: examples/dcgan's plain lines when stdout is not a terminal."""
import io
import math

from fastgan.cli import progress


def test_step_line_is_examples_dcgans():
    line = progress.step_line(2, 25, 9, 1583, [1.23456, 2.5, 0.61234, 0.3, 0.25], 123456.7)
    assert line == ("[2/25][9/1583] Loss_D: 1.2346 Loss_G: 2.5000 D(x): 0.6123 D(G(z)): 0.3000 / 0.2500 "
                    "images/s: 123457")
    assert "Loss_G: - " in progress.step_line(0, 1, 0, 2, [1.0, math.nan, 0.5, 0.5, math.nan], 1.0)


def test_a_file_gets_one_plain_line_per_report():
    out = io.StringIO()
    with progress.EpochProgress(5, 1, epoch=3, niter=4, file=out) as bar:
        for i in range(4):
            bar.update()
            if i % 2:
                bar.report([0.5, 1.5, 0.75, 0.25, 0.125], 1000.0 * i)
    assert out.getvalue().splitlines() == [
        "[3/4][2/5] Loss_D: 0.5000 Loss_G: 1.5000 D(x): 0.7500 D(G(z)): 0.2500 / 0.1250 images/s: 1000",
        "[3/4][4/5] Loss_D: 0.5000 Loss_G: 1.5000 D(x): 0.7500 D(G(z)): 0.2500 / 0.1250 images/s: 3000"]
    silent = io.StringIO()
    with progress.EpochProgress(5, 0, 0, 1, enabled=False, file=silent) as bar:
        bar.update()
        bar.report([0.0] * 5, 1.0)
    assert silent.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_without_lines():
    out = _Terminal()
    with progress.EpochProgress(5, 0, 0, 1, file=out) as bar:
        bar.update()
        bar.report([0.5] * 5, 10.0)
    text = out.getvalue()
    assert "\r" in text and "epoch 0/1" in text and "images/s:" not in text  # a bar, no plain line


def test_counter_lines_in_a_file():
    out = io.StringIO()
    with progress.Counter(100, 20, desc="caching images", unit="img", file=out, interval_s=0.0) as counter:
        for _ in range(8):
            counter.update(10)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"caching images: {n}/100 img" for n in range(30, 101, 10)]

"""Progress that reads well on a terminal and in a file: tqdm bars on a terminal, plain lines otherwise.

    step_line(epoch, niter, i, batches, stats, images_per_s)   examples/dcgan's line, plus images/s
    EpochProgress(batches, done, epoch, niter, enabled, file)  one epoch of training
    Counter(total, done, desc, unit, file)                     any long count (the image cache's build)
"""
import math
import sys
import time

from tqdm import tqdm


def _number(value):
    return f"{value:.4f}" if math.isfinite(value) else "-"  # "-": not measured yet (no G step so far)


def step_line(epoch, niter, i, batches, stats, images_per_s):
    """``[epoch/niter][i/batches] Loss_D: ... Loss_G: ... D(x): ... D(G(z)): a / b images/s: ...``, as examples/dcgan
    prints it (i: the batch just trained, from 0).  stats: Loss_D, Loss_G, D(x), D(G(z)) in the D step and in
    the G step, as floats."""
    loss_d, loss_g, d_x, d_g_z1, d_g_z2 = map(_number, stats)
    return (f"[{epoch}/{niter}][{i}/{batches}] Loss_D: {loss_d} Loss_G: {loss_g} D(x): {d_x} "
            f"D(G(z)): {d_g_z1} / {d_g_z2} images/s: {images_per_s:.0f}")


def _terminal(file):
    return hasattr(file, "isatty") and file.isatty()


class _Bar:
    """A context that closes its tqdm bar (``self.bar``, None off a terminal) at the end."""
    bar = None

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EpochProgress(_Bar):
    """A tqdm bar over an epoch's batches when ``file`` is a terminal; else :func:`step_line` lines, one per
    :meth:`report`.  ``done``: batches already trained (a resumed epoch)."""

    def __init__(self, batches, done, epoch, niter, enabled=True, file=None):
        self.file = file or sys.stdout
        self.batches, self.done, self.epoch, self.niter, self.enabled = batches, done, epoch, niter, enabled
        self.bar = tqdm(total=batches, initial=done, desc=f"epoch {epoch}/{niter}", dynamic_ncols=True,
                        file=self.file) if enabled and _terminal(self.file) else None

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def report(self, stats, images_per_s):
        if self.bar is not None:
            v = [_number(x) for x in stats]
            self.bar.set_postfix(dict(Loss_D=v[0], Loss_G=v[1], D_x=v[2], D_G_z=f"{v[3]}/{v[4]}",
                                      img_s=f"{images_per_s:.0f}"), refresh=False)
        elif self.enabled:
            print(step_line(self.epoch, self.niter, self.done - 1, self.batches, stats, images_per_s),
                  file=self.file, flush=True)


class Counter(_Bar):
    """A tqdm bar on a terminal; elsewhere a line at every tenth of ``total`` (at most one per ``interval_s``)
    and at the end."""

    def __init__(self, total, done=0, desc="", unit="it", file=None, interval_s=10.0):
        self.file = file or sys.stderr
        self.total, self.done, self.desc, self.unit, self.interval_s = total, done, desc, unit, interval_s
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=self.file,
                        dynamic_ncols=True) if _terminal(self.file) else None
        self.start, self.started_at, self.last_line = time.perf_counter(), done, -math.inf
        self.next_tenth = done + max(1, total // 10)

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.done >= self.total or (self.done >= self.next_tenth and now - self.last_line >= self.interval_s):
            rate = (self.done - self.started_at) / max(now - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.0f} {self.unit}/s)", file=self.file,
                  flush=True)
            self.last_line, self.next_tenth = now, self.done + max(1, self.total // 10)

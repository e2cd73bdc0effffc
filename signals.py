"""Signals: a stop request (SIGTERM, SIGUSR1, SIGINT, SIGHUP, SIGQUIT) ends the run after the
current optimizer step, with a checkpoint; a step that then does not end is bounded."""

import os
import signal
import sys
import threading
import time

import errors
import processes


class Preemption:
    """SIGTERM (schedulers before a kill), SIGUSR1, SIGINT, SIGHUP (a dropped ssh session), SIGQUIT:
    the first asks the loop to stop after the current optimizer step, with a checkpoint. One request
    often arrives twice (SLURM signals every process, and torchrun forwards the same signal a moment
    later): another signal within REPEAT seconds is that request; a later one stops at once. Before
    the first step, a request ends the run at once: there is nothing to save.

    A step that has not ended WAIT seconds (or 3 of the slowest step's) after the request ends the
    process without saving: a process stuck in a collective with a dead peer (NCCL waits for
    minutes) must not wait out the launcher's shutdown timeout. Python runs a signal's handler only
    once the main thread is back from C++, which a stuck collective never is; but the signal's byte
    reaches a wakeup pipe at once, and a watching thread reads it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    REPEAT = 60
    WAIT = 120

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.received = None
        self.at = None
        self.stepping = False  # the loop has begun its first step
        self.in_step = False
        self.began = 0.0  # when the step under way began
        self.slowest = 0.0
        self.before = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.wakeup = signal.set_wakeup_fd(self.write)
        self.watcher = threading.Thread(target=self.watch, args=(read,), daemon=True)
        self.watcher.start()
        processes._cleanups.append(self.restore)

    def handle(self, signum, frame):
        if self.received is not None and time.monotonic() - self.at < self.REPEAT:
            return
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        self.at = time.monotonic()
        if not self.stepping:
            raise errors.UserError(
                f"stopped by {self.received} before the first step: nothing to save; run the "
                f"same command again to go on"
            )
        print(
            f"{self.received}: stopping after this step, with a checkpoint (a signal again after "
            f"{self.REPEAT} s: at once)",
            file=sys.stderr,
            flush=True,
        )

    def step_begins(self):
        self.stepping = self.in_step = True
        self.began = time.monotonic()

    def step_ended(self, seconds):
        """The loop, once a step's collectives are done. A save is not watched (a 4B model's takes
        minutes); one stuck in a collective is ended by the process group's timeout."""
        self.in_step = False
        self.slowest = max(self.slowest, seconds)

    def watch(self, read):
        """The thread: from the first request on, ends the process if a step outlasts the bound."""
        signums = {int(s) for s in self.SIGNALS}
        while True:
            got = os.read(read, 64)  # each byte a signal's number, written by Python's C handler
            if not got:  # restore closed the pipe: the run is over
                os.close(read)
                return
            if signums & set(got):
                break
        at = time.monotonic()
        while self.write is not None:
            time.sleep(0.5)
            bound = max(self.WAIT, 3 * self.slowest)
            if self.in_step and time.monotonic() - max(at, self.began) > bound:
                print(  # on a line of its own: the progress bar's has no end
                    f"\nerror: stopped by a signal, and the step under way did not end within "
                    f"{bound:.0f} s (a process that died, or a collective that does not end): "
                    f"stopped without saving; the last checkpoint in {self.checkpoint} stands: "
                    f"run the same command again",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def restore(self):
        signal.set_wakeup_fd(self.wakeup)
        os.close(self.write)
        self.write = None
        self.watcher.join(timeout=1)
        for s, handler in self.before.items():
            signal.signal(s, handler)


def ignore_signals(worker_id):
    """A data loader worker's start: the signals are the training process's to act on."""
    for s in Preemption.SIGNALS:
        signal.signal(s, signal.SIG_IGN)

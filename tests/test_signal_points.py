"""Signal points: each signal a scheduler, a shell or torchrun sends, at each phase of a stage
(loading the models, a step, a save, the last step, publishing the output). Each ends as the README
says, loses nothing, and the same command (--auto_resume, as train.sh runs it) then ends where an
uninterrupted run ends. The handlers are the process's own again after a run; a step that waits on
a peer that never comes ends its process once a stop was asked for."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from conftest import Forked, ended, logged, processes, sft, weights

import checkpoints
import llava_kd
import models
import signals

# phase: (module, function, which call gets the signal, how the run ends: the step it stops after,
# 0 for before the first step, None for running to its end)
PHASES = {
    "loading the models": (models, "load_stage", 0, 0),
    "a step": (llava_kd, "forward_backward", 0, 1),
    "a save": (checkpoints, "save_checkpoint", 0, 2),  # step 1's save: step 2 runs, then it stops
    "the last step": (llava_kd, "forward_backward", 2, None),
    "publishing": (checkpoints, "publish", 0, None),
}


def signalled_at(monkeypatch, module, name, call, signum):
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(name)
        if len(calls) - 1 == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture(scope="module")
def three_steps(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("three_steps") / "sft.json"
    path.write_text(json.dumps(json.load(open(f"{toy}/data/sft.json"))[:48]))
    return path


def command(toy, ckpts, out, data):
    argv = sft(toy, ckpts, out, "--save_every", "1", "--auto_resume")
    argv[argv.index("--data") + 1] = str(data)
    return argv


@pytest.mark.parametrize("signum", signals.Preemption.SIGNALS, ids=lambda s: s.name)
def test_each_signal_at_each_phase_ends_as_said_and_the_same_command_goes_on(
    toy, ckpts, tmp_path, monkeypatch, three_steps, signum
):
    llava_kd.main(command(toy, ckpts, tmp_path / "whole", three_steps))
    want = weights(tmp_path / "whole")
    for phase, (module, name, call, stops) in PHASES.items():
        out = tmp_path / phase.replace(" ", "-")
        with monkeypatch.context() as m:
            signalled_at(m, module, name, call, signum)
            run = Forked(command(toy, ckpts, out, three_steps), {})
            (output,) = ended([run])
        errors = [x for x in output.splitlines() if x.startswith("error")]
        what = (phase, output[-1500:])
        assert "Traceback" not in output, what
        if stops is None:  # asked to stop when there was nothing left to do: it ended
            assert run.returncode == 0 and not errors, what
        elif stops == 0:
            assert run.returncode == 1, what
            assert errors == [
                f"error: stopped by {signum.name} before the first step: nothing to save; run the "
                f"same command again to go on"
            ], what
        else:
            assert run.returncode == 1, what
            assert errors == [
                f"error: stopped by {signum.name} at step {stops} of 3; {out}/checkpoint holds "
                f"it: continue with the same command and --resume (train.sh: the same command)"
            ], what
            assert json.load(open(out / "checkpoint" / "complete.json"))["step"] == stops, what
            assert logged(out) == list(range(1, stops + 1)), what
        again = Forked(command(toy, ckpts, out, three_steps), {})
        (output,) = ended([again])
        assert again.returncode == 0, (phase, output[-1500:])
        got = weights(out)
        assert all(torch.equal(got[k], want[k]) for k in want), phase
        assert logged(out) == [1, 2, 3], phase


def test_a_run_leaves_the_processs_signal_handlers_as_it_found_them(toy, ckpts, tmp_path):
    """After a run in this process (one that ends, one refused, one stopped): the same handlers,
    the same wakeup fd, no thread of the run left."""

    def handlers():
        wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup)
        return [signal.getsignal(s) for s in signals.Preemption.SIGNALS], wakeup

    before, threads = handlers(), threading.active_count()
    llava_kd.main(sft(toy, ckpts, tmp_path / "ends", "--max_steps", "1"))
    assert handlers() == before and threading.active_count() == threads
    with pytest.raises(SystemExit):
        llava_kd.main(sft(toy, ckpts, tmp_path / "ends", "--max_steps", "1"))  # holds a run
    assert handlers() == before and threading.active_count() == threads
    stopped = tmp_path / "stopped"
    argv = sft(toy, ckpts, stopped, "--max_steps", "3")
    forward_backward = llava_kd.forward_backward

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return forward_backward(*args)

    llava_kd.forward_backward = signalled
    try:
        with pytest.raises(SystemExit, match="stopped by SIGTERM at step 1"):
            llava_kd.main(argv)
    finally:
        llava_kd.forward_backward = forward_backward
    assert handlers() == before and threading.active_count() == threads


def test_a_stop_request_ends_a_process_whose_step_waits_on_a_peer_that_never_comes(
    toy, ckpts, tmp_path, monkeypatch
):
    """Two processes; one stops answering (SIGSTOP: as a rank whose GPU hangs, or one that NCCL
    has not yet found dead); the other is asked to stop (torchrun's SIGTERM once a rank died).
    Its step never ends, so it ends itself WAIT seconds later, with one line, saving nothing,
    instead of waiting out the launcher's 15-minute shutdown timeout."""
    monkeypatch.setattr(signals.Preemption, "WAIT", 3)
    out = tmp_path / "run"
    argv = sft(toy, ckpts, out, "--epochs", "50")
    argv[argv.index("--batch_size") + 1] = "4"
    procs = processes(*argv)
    try:
        deadline = time.time() + 120
        while not logged(out) and time.time() < deadline:  # a step logged: both are stepping
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGSTOP)
        asked = time.time()
        procs[0].send_signal(signal.SIGTERM)
        (output,) = ended(procs[:1], timeout=60)
        took = time.time() - asked
    finally:
        procs[1].kill()
        os.kill(procs[1].pid, signal.SIGCONT)
    assert procs[0].returncode == 1 and took < 30, (took, output[-2000:])
    assert output.splitlines()[-1] == (
        f"error: stopped by a signal, and the step under way did not end within 3 s (a process "
        f"that died, or a collective that does not end): stopped without saving; the last "
        f"checkpoint in {out}/checkpoint stands: run the same command again"
    ), output[-2000:]
    assert not (out / "checkpoint").exists()

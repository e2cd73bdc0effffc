"""Nothing lost: a preempted run, a crash's leftovers, a torn log, an --out in use, and data or
flags that would train on nothing are each stopped or recovered, in one line."""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import (
    ROOT,
    Forked,
    changed,
    ended,
    finish,
    launch,
    logged_steps,
    processes,
    refused,
    sft,
    weights,
)

import checkpoints
import data
import llava_kd
import processes as procs
import signals


def stop_after_first_step(procs, out, signum, times=1, gap=0.5):
    """Sends signum to the last of procs once a step is logged, `times` times `gap` s apart (a
    signal sent before the last one was handled would merge with it); returns each's output."""
    deadline = time.time() + 120
    while not logged_steps(out) and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(times):
        procs[-1].send_signal(signum)  # of two processes, the second
        time.sleep(gap)
    return ended(procs, timeout=120)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_the_step_and_resume_equals_uninterrupted(toy, ckpts, tmp_path, nproc):
    """SIGTERM (to one process of two: both stop at the same step): the step finishes, a checkpoint
    of it is written, one line says how to continue, exit 1; --resume then ends where an
    uninterrupted run does."""
    parts = tmp_path / "parts"
    argv = sft(toy, ckpts, parts, "--epochs", "50")
    if nproc == 2:
        argv[argv.index("--batch_size") + 1] = "4"
    procs = processes(*argv, nproc=2) if nproc == 2 else [launch(argv)]
    outs = stop_after_first_step(procs, parts, signal.SIGTERM)
    assert all(p.returncode == 1 for p in procs), outs
    step = json.load(open(parts / "checkpoint" / "complete.json"))["step"]
    assert step == logged_steps(parts)[-1] >= 1  # nothing lost beyond the step under way
    lines = [x for x in outs[0].splitlines() if x.startswith("error: ")]
    by = "SIGTERM" if nproc == 1 else "a signal to another process"  # rank 0 prints
    assert lines == [
        f"error: stopped by {by} at step {step} of 300; {parts}/checkpoint holds it: continue "
        f"with the same command and --resume (train.sh: the same command)"
    ], outs
    assert "Traceback" not in "".join(outs)
    end = ["--max_steps", str(step + 2)]
    resumed = [*argv, *end, "--resume"]
    finish(processes(*resumed, nproc=2) if nproc == 2 else [launch(resumed)])
    llava_kd.main(sft(toy, ckpts, tmp_path / "whole", "--epochs", "50", *end))
    a, b = weights(tmp_path / "whole"), weights(parts)
    assert changed(a, weights(ckpts / "student"))
    for k in a:  # bitwise for one process; two sum their gradients in another order
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0 if nproc == 1 else 1e-6, msg=k)
    assert logged_steps(parts) == list(range(1, step + 3))


def signalled_thrice(argv):
    p = signals.Preemption("checkpoint")
    p.REPEAT = 1.0
    p.step_begins()
    p.step_ended(0.0)  # between steps (a save): no step is watched
    os.kill(os.getpid(), signal.SIGTERM)
    print("noted", p.received)
    os.kill(os.getpid(), signal.SIGUSR1)  # within REPEAT of the first: the same request
    print("still running")
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # not reached: the third signal ends the process


def test_a_repeat_is_the_same_request_and_a_later_signal_stops_at_once():
    """The handler the loop installs: the first signal is noted (the loop stops after its step); a
    second within REPEAT seconds (a scheduler signalling every process, and torchrun passing the
    same signal on) is that request; one after REPEAT kills the process as if nothing were
    installed."""
    p = Forked([], {}, signalled_thrice)
    (output,) = ended([p], timeout=60)
    lines = output.splitlines()
    assert lines[-2:] == ["noted SIGTERM", "still running"], output
    assert p.returncode == -signal.SIGTERM, output


@pytest.mark.parametrize(
    "signum,times",
    [
        (signal.SIGHUP, 1),
        (signal.SIGQUIT, 1),
        (signal.SIGUSR1, 1),
        (signal.SIGINT, 1),
        (signal.SIGTERM, 2),
    ],
)
def test_each_signal_a_scheduler_or_a_shell_sends_checkpoints_once(
    toy, ckpts, tmp_path, signum, times
):
    """SIGHUP (an ssh session that drops), SIGQUIT, SIGUSR1 (SLURM's usual choice, which train.sh's
    torchrun forwards) and SIGINT stop after the step with a checkpoint, as SIGTERM does; SIGTERM
    twice in a moment (SLURM signals every process, and torchrun forwards the same signal) is one
    request: one checkpoint, one line, exit 1."""
    out = tmp_path / "run"
    run = [launch(sft(toy, ckpts, out, "--epochs", "50"))]
    (output,) = stop_after_first_step(run, out, signum, times, gap=0.05)  # within one step
    step = json.load(open(out / "checkpoint" / "complete.json"))["step"]
    assert step == logged_steps(out)[-1] >= 1, output
    name = signal.Signals(signum).name
    lines = [x for x in output.splitlines() if x.startswith("error: ")]
    assert lines == [
        f"error: stopped by {name} at step {step} of 300; {out}/checkpoint holds it: continue "
        f"with the same command and --resume (train.sh: the same command)"
    ], output


@pytest.mark.parametrize("sample", [20, 41])
def test_a_killed_loader_worker_checkpoints_the_last_whole_step(
    toy, ckpts, tmp_path, monkeypatch, sample
):
    """A data loader worker killed (SIGKILL: the host's OOM killer takes them first) ends the run
    with a checkpoint of the last whole step and one line naming it; --resume goes on. The worker
    kills itself at a sample, once: no timing involved. At its 41st (step 3's second micro-batch:
    it has handed over the first, at most 2 ahead of the loop) steps 1 and 2 are whole; at its 20th
    it may die while the loop takes over step 1's last micro-batch (the connection breaks)."""
    out = tmp_path / "run"
    argv = sft(toy, ckpts, out, "--epochs", "50", "--max_steps", "40")
    argv[argv.index("--workers") + 1] = "1"
    getitem, killed, fetched = data.LlavaDataset.__getitem__, tmp_path / "killed", []

    def dying(self, i):
        fetched.append(i)  # in the worker: counted from its start
        if len(fetched) == sample and not killed.exists():
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return getitem(self, i)

    monkeypatch.setattr(data.LlavaDataset, "__getitem__", dying)
    (output,) = ended([launch(argv)], timeout=120)
    assert killed.exists(), output[-3000:]
    step = json.load(open(out / "checkpoint" / "complete.json"))["step"]
    assert step == (logged_steps(out) or [0])[-1] == (2 if sample == 41 else step), output[-3000:]
    (line,) = [x for x in output.splitlines() if x.startswith("error: ")]
    assert "DataLoader worker" in line, line
    assert line.endswith(f"fewer --workers); {out}/checkpoint holds step {step}: --resume"), line
    assert "Traceback" not in output
    finish([launch([*argv, "--resume"])])
    assert logged_steps(out) == list(range(1, 41))


def test_leftover_checkpoints_are_found_and_never_block_a_save(toy, ckpts, tmp_path):
    """A crash's leftovers: checkpoint.old/ does not block the next save; with checkpoint/ gone,
    --resume takes the newest complete one of .tmp/ and .old/; a damaged one is refused in one
    line naming the file; a run without --resume deletes none of them."""
    out = tmp_path / "run"
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "1", "--save_every", "1"))
    ckpt = out / "checkpoint"
    shutil.copytree(ckpt, out / "checkpoint.old")  # as a crash inside a save leaves it
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "2", "--save_every", "1", "--resume"))
    assert json.load(open(ckpt / "complete.json"))["step"] == 2
    assert not (out / "checkpoint.old").exists()
    os.rename(ckpt, out / "checkpoint.tmp")  # the crash came between the two renames
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "3", "--save_every", "1", "--resume"))
    assert logged_steps(out) == [1, 2, 3]
    os.rename(ckpt, out / "checkpoint.old")
    message = refused(sft(toy, ckpts, out, "--max_steps", "4"))  # no --resume: nothing deleted
    assert (
        "holds another run (config.json, log.jsonl, checkpoint.old): continue it with --resume"
        in message
    )
    assert (out / "checkpoint.old" / "complete.json").exists()
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "4", "--save_every", "1", "--resume"))
    assert logged_steps(out) == [1, 2, 3, 4]
    for name, damage in [("config.json", "missing"), ("model.safetensors", "cut")]:
        broken = tmp_path / name
        shutil.copytree(out, broken)
        file = broken / "checkpoint" / name
        if damage == "missing":
            os.remove(file)
            problem = f"{file} is missing"
        else:
            size = os.path.getsize(file)
            os.truncate(file, size // 2)
            problem = f"{file} has {size // 2} bytes where the save wrote {size}"
        message = refused(sft(toy, ckpts, broken, "--max_steps", "5", "--resume"))
        assert message == (
            f"error: --resume: no complete checkpoint in {broken} ({broken}/checkpoint: "
            f"{problem}); start again on a new --out"
        )


def test_a_full_disk_while_saving_says_so_and_keeps_the_last_checkpoint(
    toy, ckpts, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "1", "--save_every", "1"))
    save = torch.save

    def full(obj, f, *a, **kw):
        if str(f).endswith("train_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    message = refused(sft(toy, ckpts, out, "--max_steps", "2", "--save_every", "1", "--resume"))
    assert message.startswith(f"error: no space left on the device of {out} while writing the ")
    assert json.load(open(out / "checkpoint" / "complete.json"))["step"] == 1
    assert not (out / "checkpoint.tmp").exists()


def test_a_torn_log_line_is_dropped_on_resume(toy, ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "2", "--save_every", "1"))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"loss":')  # a crash (or a full disk) cut the line
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "3", "--save_every", "1", "--resume"))
    assert (
        f"note: {out}/log.jsonl: dropped 1 line(s) cut short by a crash" in capsys.readouterr().out
    )
    assert logged_steps(out) == [1, 2, 3]


def test_out_is_guarded_and_locked(toy, ckpts, tmp_path):
    out = tmp_path / "run"
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "1"))
    before = open(out / "log.jsonl").read()
    message = refused(sft(toy, ckpts, out, "--max_steps", "1"))
    assert "holds another run (config.json, log.jsonl, checkpoint)" in message
    assert open(out / "log.jsonl").read() == before  # neither emptied nor appended
    argv = sft(toy, ckpts, out, "--max_steps", "1")
    argv[argv.index("--init") + 1] = str(out)
    assert "--init and --out are both" in refused(argv)
    # a lock held by a live process on this host refuses; one left by a dead process is taken over
    fresh = tmp_path / "fresh"
    os.makedirs(fresh)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (fresh / "run.lock").write_text(f"{socket.gethostname()} {live.pid}")
    message = refused(sft(toy, ckpts, fresh, "--max_steps", "1"))
    assert f"--out {fresh} is in use by process {live.pid} on {socket.gethostname()}" in message
    live.kill()
    live.wait()
    llava_kd.main(sft(toy, ckpts, fresh, "--max_steps", "1"))
    assert not (fresh / "run.lock").exists()  # removed at the end


def test_two_runs_on_one_out_at_once_the_second_is_refused(toy, ckpts, tmp_path):
    out = tmp_path / "run"
    first = launch(sft(toy, ckpts, out, "--epochs", "50"))
    deadline = time.time() + 120
    while not (out / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = launch(sft(toy, ckpts, out, "--max_steps", "1"))
    (output,) = stop_after_first_step([second], out, signal.SIGCONT)  # waits for it to end
    assert second.returncode == 1 and f"--out {out} is in use by process {first.pid}" in output
    first.kill()
    first.wait()


def with_sample(toy, tmp_path, **changes):
    """The toy's sft data with its first sample changed; (json path, that sample's id)."""
    rows = json.load(open(f"{toy}/data/sft.json"))
    rows[0].update(changes)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return str(path), rows[0]["id"]


def test_data_that_would_train_on_nothing_is_refused_by_id_before_weights_load(
    toy, ckpts, tmp_path, no_weights
):
    argv = sft(toy, ckpts, tmp_path / "out", "--max_length", "30")
    message = refused(argv)  # every prompt fills 30 tokens: no answer token left
    assert "sample(s) have no answer token within --max_length 30: sft_0 (needs " in message
    for changes, problem in [
        (
            dict(conversations=[{"from": "human", "value": "Q?"}, {"from": "gpt", "value": " "}]),
            "an empty answer",
        ),
        (
            dict(
                conversations=[
                    {"from": "human", "value": "Q\ud800?"},
                    {"from": "gpt", "value": "A"},
                ]
            ),
            "text that is not valid Unicode",
        ),
        (dict(image="no-such.png"), "image file"),
    ]:
        path, sid = with_sample(toy, tmp_path, **changes)
        argv = sft(toy, ckpts, tmp_path / "out")
        argv[argv.index("--data") + 1] = path
        assert f"sample {sid}: {problem}" in refused(argv)


def test_answers_cut_short_are_reported_before_weights_load(
    toy, ckpts, tmp_path, capsys, no_weights
):
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "red " * 3000}]
    path, sid = with_sample(toy, tmp_path, conversations=turns)
    argv = sft(toy, ckpts, tmp_path / "out")
    argv[argv.index("--data") + 1] = path
    with pytest.raises(AssertionError, match="weights were loaded"):
        llava_kd.main(argv)
    assert (
        f"note: {path}: 1 answer(s) cut short by --max_length 2048 (their end token is not "
        f"trained), e.g. {sid}"
    ) in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "0"),
        ("--epochs", "0"),
        ("--max_steps", "0"),
        ("--batch_size", "0"),
        ("--batch_size", "-1"),
        ("--global_batch_size", "0"),
        ("--max_length", "0"),
    ],
)
def test_numeric_flags_out_of_range_are_refused(toy, ckpts, tmp_path, no_weights, flag, value):
    argv = sft(toy, ckpts, tmp_path / "out")
    argv += [flag, value]
    message = refused(argv)
    assert message.startswith(f"error: {flag} {value}") and ": must be " in message


def test_resume_with_another_stage_or_lr_is_refused(toy, ckpts, tmp_path):
    out = tmp_path / "run"
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "1", "--save_every", "1"))
    argv = sft(toy, ckpts, out, "--max_steps", "2", "--resume", "--lr", "5e-3")
    argv[argv.index("--stage") + 1] = "dft"
    argv += ["--teacher", str(ckpts / "teacher")]
    message = refused(argv)
    assert "--stage sft (now dft)" in message and "--lr 0.001 (now 0.005)" in message
    assert "--teacher None" in message


def test_an_image_that_fails_to_decode_mid_run_leaves_a_checkpoint_and_a_line(toy, ckpts, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(f"{toy}/data/images", images)
    rows = json.load(open(f"{toy}/data/sft.json"))
    victim = next(r for r in rows if r.get("image"))
    file = images / victim["image"]
    full = file.read_bytes()
    file.write_bytes(full[: len(full) // 2])  # the header is whole, the pixels are not
    out = tmp_path / "run"
    argv = sft(toy, ckpts, out, "--max_steps", "6")
    argv[argv.index("--images") + 1] = str(images)
    message = refused(argv)
    done = logged_steps(out)[-1] if logged_steps(out) else 0
    assert message.startswith(
        f"error: {toy}/data/sft.json: sample {victim['id']}: cannot decode image {file} ("
    )
    assert message.endswith(
        f"; {out}/checkpoint holds step {done}: replace the file with a readable image, --resume"
    )
    assert json.load(open(out / "checkpoint" / "complete.json"))["step"] == done
    file.write_bytes(full)
    llava_kd.main([*argv, "--resume"])
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_rank0_failing_inside_a_save_stops_every_process_with_its_line(
    toy, ckpts, tmp_path, monkeypatch
):
    """Rank 0 writes the checkpoint while the others wait (for up to 2 hours: a 4B model's save).
    An error there (not a full disk: an I/O error) reaches them at once: every process ends within
    seconds with exit 1, rank 0's last line names the error, no other process shows a traceback of
    a broken collective, and the checkpoint before stays whole."""
    save = checkpoints.save_checkpoint

    def failing(model, processor, state, out, *rest):
        if state["step"] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return save(model, processor, state, out, *rest)

    monkeypatch.setattr(checkpoints, "save_checkpoint", failing)  # the forked processes inherit it
    out = tmp_path / "run"
    argv = sft(toy, ckpts, out, "--save_every", "1", "--max_steps", "3")
    argv[argv.index("--batch_size") + 1] = "4"
    procs = processes(*argv)
    outs = ended(procs, timeout=120)
    assert [p.returncode for p in procs] == [1, 1], outs
    assert outs[0].splitlines()[-1] == (
        "error: rank 0: OSError: [Errno 5] Input/output error, while writing the checkpoint of "
        "step 2 (the last complete one is kept: --resume)"
    ), outs[0][-2000:]
    assert "Traceback" not in outs[1], outs[1][-2000:]
    assert json.load(open(out / "checkpoint" / "complete.json"))["step"] == 1


def test_train_sh_passes_a_signal_on_to_its_stage(toy, ckpts, tmp_path):
    """`bash train.sh` as a batch script, signalled alone (scancel --batch, or a scheduler's
    --signal=B:USR1): bash passes the signal on to the stage it runs (without that, bash would
    hold it until the stage ended, or die and leave the stage running), which checkpoints the step
    and stops; train.sh ends with the stage's line and status."""
    out = tmp_path / "run"
    env = dict(
        os.environ,
        INIT=str(ckpts / "student"),
        TEACHER=str(ckpts / "teacher"),
        SFT_DATA=f"{toy}/data/sft.json",
        SFT_IMAGES=f"{toy}/data/images",
        OUT=str(out),
        NGPU="1",
        BATCH="8",
        EXTRA="--workers 0 --global_batch_size 16 --epochs 50 --lr 1e-3 --save_every 1000",
        PYTHON=sys.executable,
    )
    with open(tmp_path / "output.txt", "w") as f:
        p = subprocess.Popen(
            ["bash", "train.sh"],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while not logged_steps(out / "student-dft") and time.time() < deadline:
            time.sleep(0.1)
        p.send_signal(signal.SIGUSR1)  # to bash alone
        assert p.wait(timeout=120) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):  # a stage left running
            os.killpg(p.pid, signal.SIGKILL)
    output = (tmp_path / "output.txt").read_text()
    stage = out / "student-dft"
    step = json.load(open(stage / "checkpoint" / "complete.json"))["step"]
    assert step == logged_steps(stage)[-1] >= 1
    last = output.splitlines()[-1]
    assert last.startswith(f"error: stage dft --out {stage}: stopped by SIGUSR1 at step {step} "), (
        last
    )


def test_a_run_that_failed_before_its_first_checkpoint_leaves_nothing_that_blocks_it(
    toy, ckpts, tmp_path, monkeypatch
):
    """A crash before the first checkpoint (at the first step, or after steps were logged) leaves a
    log and no checkpoint: the same command starts again, with that log's lines dropped."""
    out = tmp_path / "run"
    argv = sft(toy, ckpts, out, "--max_steps", "3", "--save_every", "2")
    forward_backward = llava_kd.forward_backward

    def crashing_at(step):
        def crashing(a, r, micro, counts, ddp, device, at):
            if at == step:
                raise RuntimeError("a shape error, a CUDA error, ...")
            return forward_backward(a, r, micro, counts, ddp, device, at)

        return crashing

    for crash_at in (0, 1):
        monkeypatch.setattr(llava_kd, "forward_backward", crashing_at(crash_at))
        with pytest.raises(RuntimeError, match="a shape error"):
            llava_kd.main(argv)
        assert logged_steps(out) == list(range(1, crash_at + 1))
        assert not (out / "checkpoint").exists()
    monkeypatch.setattr(llava_kd, "forward_backward", forward_backward)
    llava_kd.main(argv)
    assert logged_steps(out) == [1, 2, 3]


def test_the_long_waits_are_on_the_long_group_and_training_on_the_default_one(
    toy, ckpts, tmp_path, monkeypatch
):
    """Waits that may last (every process checking its share of the data, rank 0 writing a 4B
    model's checkpoint, an error's barrier) are on the gloo group of 2 hours; the training's
    collectives on the default group (NCCL: 10 minutes, so a dead peer ends them)."""
    calls = tmp_path / "calls"
    calls.mkdir()

    def recording(name, real):
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            which = "long" if group is procs._waits[-1] else "default" if group is None else "?"
            with open(calls / str(os.getpid()), "a") as f:
                f.write(f"{name} {which}\n")
            return real(*args, **kwargs)

        return recorded

    for name in ("all_gather_object", "barrier", "all_reduce"):
        monkeypatch.setattr(dist, name, recording(name, getattr(dist, name)))
    argv = sft(toy, ckpts, tmp_path / "run", "--max_steps", "2", "--save_every", "1")
    argv[argv.index("--batch_size") + 1] = "4"
    finish(processes(*argv))
    argv[argv.index("--global_batch_size") + 1] = "400"  # an agreed error: every process waits
    ended(processes(*argv))
    seen = {line for f in calls.iterdir() for line in open(f).read().splitlines()}
    assert seen == {"all_gather_object long", "barrier long", "all_reduce default"}, seen

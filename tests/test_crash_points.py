"""Crash points: every filesystem write of a stage (its log, each checkpoint's files, renames and
removals, the output it publishes, the markers) made in turn to find a full disk, or to stop the
process right there (as SIGKILL or a power cut would). The same command (--auto_resume, as train.sh
runs it) then ends where an uninterrupted run ends: the same weights, each step logged once, no
checkpoint left behind, no step trained again that a complete checkpoint held. A stage marked done
loads at every point."""

import builtins
import errno
import json
import os
import shutil
import sys

import pytest
import safetensors
import torch
import transformers
from conftest import Forked, args, ended, logged, weights

import llava_kd

# The calls through which a run writes or moves a file, each named by where it lives. "write" may
# find the disk full; a rename or a removal needs no space, so it can only be stopped at.
WRITES = [
    (builtins, "open", "write"),
    (os, "open", "write"),
    (os, "link", "write"),
    (shutil, "copy", "write"),
    (torch, "save", "write"),
    (transformers.modeling_utils, "safe_save_file", "write"),  # save_pretrained's safetensors
    (os, "replace", "move"),
    (os, "rename", "move"),
    (os, "remove", "move"),
    (os, "unlink", "move"),
    (shutil, "rmtree", "move"),
]


def writes(fn, path, args, kwargs):
    """Whether this call writes or moves a file under path."""
    if fn in ("open", "os.open") and len(args) > 1:
        mode = args[1]
        if fn == "os.open" and not mode & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            return False
        if fn == "open" and isinstance(mode, str) and not set(mode) & set("wax+"):
            return False
    elif fn in ("open", "os.open"):
        mode = kwargs.get("mode", "r")
        if fn == "os.open" or not set(mode) & set("wax+"):
            return False
    return str(where(fn, args)).startswith(path)


def where(fn, args):
    return args[1] if fn in ("safe_save_file", "save") else args[0]


class Points:
    """Counts the writes under `path`; at the `at`-th, the process stops (fault "stop"), or from
    it on, every write finds the disk full ("full")."""

    def __init__(self, monkeypatch, path, at=None, fault=None):
        self.seen = []
        for module, name, kind in WRITES:
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name), name, kind))
        self.path, self.at, self.fault = str(path), at, fault

    def wrap(self, real, name, kind):
        fn = f"os.{name}" if real is os.open else name

        def call(*args, **kwargs):
            if not writes(fn, self.path, args, kwargs):
                return real(*args, **kwargs)
            self.seen.append((fn, kind, os.path.relpath(str(where(fn, args)), self.path)))
            if len(self.seen) - 1 == self.at and self.fault == "stop":
                sys.stdout.flush()
                os._exit(137)
            if self.fault == "full" and len(self.seen) - 1 >= self.at and kind == "write":
                if fn == "safe_save_file":  # a full disk stays full: every write from here on
                    raise safetensors.SafetensorError("No space left on device (os error 28)")
                raise OSError(errno.ENOSPC, "No space left on device", str(where(fn, args)))
            return real(*args, **kwargs)

        return call


def command(toy, ckpts, out, data):
    argv = args(toy, "sft", out, "--init", str(ckpts / "student"), "--lr", "1e-3")
    argv[argv.index("--data") + 1] = str(data)
    return [*argv, "--save_every", "1", "--auto_resume"]  # 2 steps: a save each, then published


@pytest.fixture(scope="module")
def two_steps(toy, tmp_path_factory):
    """A data file of 32 samples: 2 steps of 16, the whole schedule."""
    path = tmp_path_factory.mktemp("two_steps") / "sft.json"
    path.write_text(json.dumps(json.load(open(f"{toy}/data/sft.json"))[:32]))
    return path


def saved_step(out):
    """The step of the newest checkpoint in out that holds every file its complete.json lists."""
    steps = [0]
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        try:
            marker = json.load(open(out / name / "complete.json"))
            whole = all(os.path.getsize(out / name / f) == n for f, n in marker["files"].items())
        except (OSError, ValueError):
            continue
        steps += [marker["step"]] if whole else []
    return max(steps)


def trained_steps(monkeypatch, record):
    """Each step a process forked from here trains, appended to record."""
    forward_backward = llava_kd.forward_backward

    def recorded(a, r, micro, counts, ddp, device, step):
        with open(record, "a") as f:
            f.write(f"{step + 1}\n")
        return forward_backward(a, r, micro, counts, ddp, device, step)

    monkeypatch.setattr(llava_kd, "forward_backward", recorded)


@pytest.mark.parametrize("fault", ["stop", "full"])
def test_every_write_of_a_stage_crashed_in_turn_then_the_same_command_ends_as_uninterrupted(
    toy, ckpts, tmp_path, monkeypatch, two_steps, fault
):
    whole = tmp_path / "whole"
    with monkeypatch.context() as m:
        points = Points(m, whole)
        llava_kd.main(command(toy, ckpts, whole, two_steps))
    want = weights(whole)
    assert logged(whole) == [1, 2] and not (whole / "checkpoint").exists()
    kinds = [kind for _, kind, _ in points.seen]
    at = [i for i, kind in enumerate(kinds) if fault == "stop" or kind == "write"]
    assert len(at) > 20, points.seen  # the log, two saves, the output, the markers
    for i in at:
        out = tmp_path / f"{fault}{i}"
        what = f"{fault} at write {i}: {points.seen[i]}"
        with monkeypatch.context() as m:
            Points(m, out, i, fault)
            run = Forked(command(toy, ckpts, out, two_steps), {})
            (output,) = ended([run])
        if fault == "stop":
            assert run.returncode == 137, (what, output[-2000:])
        else:  # one line naming the full disk, no traceback
            errors = [x for x in output.splitlines() if x.startswith("error")]
            assert run.returncode == 1 and "Traceback" not in output, (what, output[-2000:])
            assert len(errors) == 1 and "o space left on" in errors[0], (what, output[-2000:])
        done = (out / "done.json").exists()
        if done:  # a stage marked done has its whole output
            got = weights(out)
            assert all(torch.equal(got[k], want[k]) for k in want), what
        kept = 2 if done else saved_step(out)
        record = tmp_path / f"{fault}{i}.trained"
        with monkeypatch.context() as m:
            trained_steps(m, record)
            again = Forked(command(toy, ckpts, out, two_steps), {})
            (output,) = ended([again])
        assert again.returncode == 0, (what, output[-2000:])
        trained = record.read_text().split() if record.exists() else []
        assert trained == [str(s) for s in range(kept + 1, 3)], (what, kept, trained)  # no more
        got = weights(out)
        assert all(torch.equal(got[k], want[k]) for k in want), what
        assert logged(out) == [1, 2], what
        assert json.load(open(out / "done.json"))["step"] == 2, what
        left = {"checkpoint", "checkpoint.tmp", "checkpoint.old"} & set(os.listdir(out))
        assert not left, (what, left)  # (a run.lock of the stopped process is taken over)

"""train.sh as a program, run with a stand-in Python that records each command it is given: every
combination of its settings against the commands it launches (written here from the README's rules,
not from train.sh), the signals it passes on in the toy recipe, and one recipe an OUT."""

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, default_signals

import signals

STANDIN = """#!{python}
import json, os, signal, sys, time
def record(**what):
    with open(os.environ["STANDIN_RECORD"], "a") as f:
        f.write(json.dumps(what) + "\\n")
argv = sys.argv[1:]
if argv[:1] == ["-c"]:  # train.sh's count of the GPUs
    print(1)
    sys.exit(0)
stage = "train" in argv and os.environ.get("STANDIN_SECONDS")
if stage:  # a stage: stops on a signal, as one does; its handlers are up before it says it started
    def stop(signum, frame):
        name = signal.Signals(signum).name
        record(event="signal", pid=os.getpid(), signal=name)
        print(f"error: stopped by {{name}} at step 1 of 2; ...", file=sys.stderr)
        sys.exit(1)
    for s in {signals}:
        signal.signal(s, stop)
record(event="start", pid=os.getpid(), argv=argv)
if stage:  # tqdm's progress line, as a stage writes it, once it has loaded
    name = argv[argv.index("--stage") + 1]
    time.sleep(1.5)
    print(f"{{name}}:  50%|##  | 1/2 [00:01<00:01,  1.00it/s, loss=0.5, L_reg=0.5]\\r", end="",
          file=sys.stderr, flush=True)
    time.sleep(float(os.environ["STANDIN_SECONDS"]))
    sys.exit(int(os.environ.get("STANDIN_EXIT", 0)))
"""


@pytest.fixture
def standin(tmp_path):
    python = tmp_path / "python"
    names = "(" + ", ".join(f"signal.{s.name}" for s in signals.Preemption.SIGNALS) + ")"
    python.write_text(STANDIN.format(python=sys.executable, signals=names))
    python.chmod(0o755)
    record = tmp_path / "record.jsonl"
    env = dict(os.environ, PYTHON=str(python), STANDIN_RECORD=str(record), OUT=str(tmp_path / "O"))
    for name in ("NGPU", "NNODES", "FSDP", "TEACHER", "INIT", "EXTRA"):
        env.pop(name, None)
    return env, record


def records(record, event="start"):
    if not record.exists():
        return []
    return [r for r in map(json.loads, open(record)) if r["event"] == event]


def launched(argv, ngpu, nnodes, node_rank="0"):
    """(the launcher's flags, or None for a plain python; the stage's flags)."""
    i = argv.index("llava_kd.py")
    if i == 0:
        return None, argv[2:]
    assert argv[0] == "processes.py", argv  # torchrun, without its traceback
    return argv[1:i], argv[i + 2 :]


def expected_launcher(ngpu, nnodes, fsdp):
    """The README: one process needs no launcher; else torchrun, --standalone on one node, its
    rendezvous on several; every signal passed on, 15 minutes for the workers to checkpoint."""
    if ngpu * nnodes == 1 and not fsdp:
        return None
    nodes = ["--standalone"]
    if nnodes > 1:
        nodes = [f"--nnodes={nnodes}", "--node_rank=1", "--master_addr=A", "--master_port=29500"]
    names = ",".join(s.name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    names += ",SIGQUIT,SIGUSR1"
    handled = [f"--signals_to_handle={names}", "--shutdown_timeout=900"]
    return [*nodes, f"--nproc_per_node={ngpu}", *handled]


REAL = dict(
    VISION="V",
    STUDENT_LLM="SL",
    TEACHER_LLM="TL",
    PT_DATA="P.json",
    PT_IMAGES="PI",
    SFT_DATA="S.json",
    SFT_IMAGES="SI",
)


EVERY = list(itertools.product((1, 2), (1, 2), ("auto", "1", "0")))  # NGPU, NNODES, FSDP
SOME = [(1, 1, "auto"), (2, 1, "auto"), (1, 2, "1")]


@pytest.mark.parametrize(
    "recipe,settings", [("real", EVERY), ("real with TEACHER", SOME), ("dft only", SOME)]
)
def test_every_setting_launches_the_stages_the_readme_says(standin, recipe, settings):
    """NGPU x NNODES x FSDP: each stage's launcher (a plain python for one process, torchrun's flags
    otherwise: one GPU a node on two nodes is two processes), its --fsdp (auto: sft and dft on
    several processes; 1: all; 0: none), its chain of --init and --teacher."""
    env, record = standin
    for ngpu, nnodes, fsdp in settings:
        record.unlink(missing_ok=True)
        settings = dict(NGPU=str(ngpu), NNODES=str(nnodes), FSDP=fsdp)
        if nnodes > 1:
            settings.update(NODE_RANK="1", MASTER_ADDR="A")
        if recipe == "dft only":
            settings.update(INIT="I", TEACHER="T", SFT_DATA="S.json", SFT_IMAGES="SI")
        else:
            settings.update(REAL, **({"TEACHER": "T"} if "TEACHER" in recipe else {}))
        run = subprocess.run(
            ["bash", "train.sh"], cwd=ROOT, env=dict(env, **settings), capture_output=True
        )
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        out = env["OUT"]
        chain = {  # --out: (stage, --init, --teacher)
            "teacher-pt": ("pt", None, None),
            "teacher": ("sft", f"{out}/teacher-pt", None),
            "student-dpt": ("dpt", None, "T" if "TEACHER" in recipe else f"{out}/teacher"),
            "student-dpt-sft": ("sft", f"{out}/student-dpt", None),
        }
        chain["student-llava-kd"] = ("dft", f"{out}/student-dpt-sft", chain["student-dpt"][2])
        if "TEACHER" in recipe:
            del chain["teacher-pt"], chain["teacher"]
        if recipe == "dft only":
            chain = {"student-dft": ("dft", "I", "T")}
        stages = []
        runs = [r["argv"] for r in records(record)]
        plots = [argv for argv in runs if argv[1:2] == ["plot"]]  # the student's curves, at the end
        students = [f"{out}/{name}" for name in list(chain)[-3:]]
        assert plots == ([] if recipe == "dft only" else [runs[-1]]), (recipe, ngpu, nnodes)
        assert all(p[2:] == [*students, "--out", f"{out}/curves.png"] for p in plots), plots
        for argv in runs[: len(runs) - len(plots)]:
            launcher, flags = launched(argv, ngpu, nnodes)
            value = {w: flags[i + 1] for i, w in enumerate(flags[:-1]) if w.startswith("--")}
            stage = value["--stage"]
            sharded = fsdp == "1" or (
                fsdp == "auto" and ngpu * nnodes > 1 and stage in ("sft", "dft")
            )
            case = (recipe, ngpu, nnodes, fsdp, stage)
            assert launcher == expected_launcher(ngpu, nnodes, sharded), case
            assert ("--fsdp" in flags) == sharded and flags[-1] == "--auto_resume", case
            name = os.path.relpath(value["--out"], out)
            assert (stage, value.get("--init"), value.get("--teacher")) == chain[name], case
            stages.append(name)
        assert stages == list(chain), (recipe, ngpu, nnodes, fsdp)


@pytest.mark.parametrize("recipe", ["real", "dft only"])
def test_the_held_out_settings_reach_their_stages(standin, recipe):
    """EVAL_DATA (EVAL_IMAGES, else SFT_IMAGES) to sft and dft, PT_EVAL_DATA (PT_EVAL_IMAGES, else
    PT_IMAGES) to pt and dpt, every EVAL_EVERY steps (200 unless set); none without them."""
    env, record = standin
    held = dict(EVAL_DATA="E.json", PT_EVAL_DATA="PE.json", PT_EVAL_IMAGES="PEI", EVAL_EVERY="50")
    settings = (
        REAL if recipe == "real" else dict(INIT="I", TEACHER="T", SFT_DATA="S", SFT_IMAGES="SI")
    )
    for given in (held, {}):
        record.unlink(missing_ok=True)
        run = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=dict(env, **settings, **given))
        assert run.returncode == 0
        for r in records(record):
            _, flags = launched(r["argv"], 1, 1)
            if "--stage" not in flags:
                continue  # the plot
            pt = flags[flags.index("--stage") + 1] in ("pt", "dpt")
            want = ["--eval_data", "PE.json", "--eval_images", "PEI", "--eval_every", "50"]
            if not pt:
                want = ["--eval_data", "E.json", "--eval_images", "SI", "--eval_every", "50"]
            i = flags.index("--eval_data") if "--eval_data" in flags else len(flags)
            assert flags[i : i + 6] == (want if given else []), flags


def start(env, **settings):
    return subprocess.Popen(
        ["bash", "train.sh"],
        cwd=ROOT,
        env=dict(env, **settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the recipe's processes: one group, ended together below
        preexec_fn=default_signals,
    )


def running_stages(record, n, proc):
    deadline = time.time() + 60
    while len(records(record)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return [r for r in records(record) if "train" in r["argv"]]


@pytest.mark.parametrize("signum", signals.Preemption.SIGNALS, ids=lambda s: s.name)
def test_the_toy_recipe_passes_each_signal_on_to_every_stage_and_starts_nothing_after(
    standin, signum
):
    """`kill PID`, `scancel --batch`, Ctrl-C, SIGQUIT or SIGUSR1 to train.sh alone: every stage
    running gets the same signal (and stops with its checkpoint), nothing starts after it, no
    process is left, and train.sh ends with the stages' error lines, exit 1."""
    env, record = standin
    proc = start(env, SEEDS="1", STANDIN_SECONDS="30")
    try:
        stages = running_stages(record, 3, proc)  # toy.py setup, then the first of two chains
        assert len(stages) == 2, records(record)  # each with its handlers up
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    got = {r["pid"]: r["signal"] for r in records(record, "signal")}
    assert got == {s["pid"]: signum.name for s in stages}, (got, err)
    assert len(records(record)) == 3, records(record)  # nothing started after the signal
    assert err.count(f"error: stopped by {signum.name}") == 2, err
    for s in stages:
        with pytest.raises(ProcessLookupError):
            os.kill(s["pid"], 0)


def test_a_second_recipe_on_one_out_is_refused_at_once_and_the_first_goes_on(standin):
    env, record = standin
    first = start(env, SEEDS="1", STANDIN_SECONDS="30")
    try:
        running_stages(record, 3, first)
        second = start(env, SEEDS="1", STANDIN_SECONDS="30")
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1 and first.poll() is None, err
        assert err.strip() == (
            f"error: {env['OUT']} is in use by another train.sh (pid {first.pid}): wait for "
            f"it, or give another OUT"
        )
        assert len(records(record)) == 3  # the second started nothing
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)


def test_the_toy_recipe_says_where_each_running_chain_is(standin):
    """Every PROGRESS_EVERY seconds a line: each chain whose progress moved, its stage, step and
    loss (from the stage's progress line in the chain's log)."""
    env, record = standin
    proc = start(env, SEEDS="1", STANDIN_SECONDS="30", PROGRESS_EVERY="1")
    try:
        running_stages(record, 3, proc)
        deadline = time.time() + 30
        line = ""
        while "teacher:" not in line and time.time() < deadline:
            line = proc.stdout.readline()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert re.fullmatch(r"\[\d+ s\] teacher: pt 1/2 loss 0.5 \| baseline1: pt 1/2 loss 0.5\n", line)


def test_a_failed_recipe_leaves_nothing_that_holds_its_out(standin):
    """A chain fails, train.sh ends: the same command at once is not refused for a lock that a
    process of the first still holds (the progress line's sleep, say)."""
    env, _ = standin
    for run in range(2):
        proc = start(env, SEEDS="1", STANDIN_SECONDS="0", STANDIN_EXIT="1", PROGRESS_EVERY="60")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "in use by another train.sh" not in err, (run, err)
        assert "error: the toy recipe's teacher stages failed" in err, err

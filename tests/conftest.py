import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)  # this file also runs as a script (the recipe's stops)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may come from a model hub
# tiny models: a second thread only spins, beside the recipe's processes
os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytest  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402
import transformers  # noqa: E402

import checkpoints  # noqa: E402
import llava_kd  # noqa: E402
import models  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# no tqdm monitor thread: test_train.Forked forks this process, and a lock that the thread held at
# that moment would stay held in the child
tqdm.tqdm.monitor_interval = 0


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy setup, small: tiny checkpoints and a few samples, written once per test session."""
    import toy as setup

    out = str(tmp_path_factory.mktemp("toy"))
    setup.make_toy(out, seed=0, **setup.QUICK)
    return out


@pytest.fixture(scope="session")
def ckpts(toy, tmp_path_factory):
    """An (untrained) teacher and student LLaVA checkpoint built from the toy parts."""
    import torch

    out = tmp_path_factory.mktemp("ckpts")
    for name in ("teacher", "student"):
        torch.manual_seed(0)
        model, proc = models.build_student(f"{toy}/vision", f"{toy}/{name}_llm")
        checkpoints.save_checkpoint_files(model, proc, out / name)
    return out


def pytest_collection_modifyitems(items):
    """test_recipe.py's test last: its train.sh (the fixture below) runs beside all the others."""
    items.sort(key=lambda item: item.module.__name__ == "test_recipe")


TOY_RECIPE = dict(SEEDS="1", TOY_STEPS="4", TOY_QUICK="1", NGPU="1", TOY_SEED="1")
STARTED = []  # the train.sh runs this process started


def default_signals():
    """A child's start (preexec_fn): the stop signals at their defaults, whatever this process was
    started with (nohup ignores SIGHUP, a background job SIGINT and SIGQUIT): bash cannot trap a
    signal that was ignored when it started."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, signal.SIG_DFL)


def start_recipe(out, **env):
    """`bash train.sh`'s toy recipe, shortened (TOY_RECIPE), into out; its output in out.txt."""
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **TOY_RECIPE, **env)
    with open(f"{out}.txt", "a") as f:
        STARTED.append(
            subprocess.Popen(
                ["bash", "train.sh"],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # train.sh and the stages it starts: one process group
                preexec_fn=default_signals,
            )
        )
    return STARTED[-1]


def stop_all(*_):
    """Every train.sh this process started, and the stages they started."""
    for p in STARTED:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    sys.exit(1)


def stop_in_the_dft_stage(out, proc):
    """SIGKILL of the process of LLaVA-KD's third stage (DFT) once it has saved a checkpoint and
    before it ends (stopped first, then checked); its checkpoint's step, the log's lines to it."""
    stage = out / "seed1" / "dpt-sft-dft"
    marker = stage / "checkpoint" / "complete.json"
    while proc.poll() is None:
        found = subprocess.run(
            ["pgrep", "-f", "--", f"--out {stage} "], capture_output=True, text=True
        )
        pids = [int(p) for p in found.stdout.split()]
        if pids and marker.exists():
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            step = json.load(open(marker))["step"]
            done = (stage / "done.json").exists()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            logged = open(stage / "log.jsonl").readlines()[:step]
            return None if done else (step, logged)
        time.sleep(0.05)
    return None


def gone(group, timeout=10):
    """Waits (a while) until every process of the group has ended."""
    deadline = time.time() + timeout
    while subprocess.run(["pgrep", "-g", str(group)], capture_output=True).stdout:
        if time.time() > deadline:
            return
        time.sleep(0.05)


def stop_between_stages(out, proc):
    """SIGKILL of train.sh and everything it started, once the first distilled stage (DPT) is
    finished; the number of stages finished then."""
    while proc.poll() is None:
        if (out / "seed1" / "dpt" / "done.json").exists():
            os.killpg(proc.pid, signal.SIGKILL)
            gone(proc.pid)
            return len(list(out.glob("**/done.json")))
        time.sleep(0.05)
    return None


def stopped_and_continued(out, stop):
    """The toy recipe stopped once by stop(out, proc) and run again with the same command: (what
    stop returned, the first run's exit status, the finished stages' files then, the second run's
    exit status)."""
    proc = start_recipe(out, EXTRA="--save_every 1")
    stopped = stop(out, proc)
    first = proc.wait(timeout=900)
    finished = {
        str(p): os.stat(p).st_mtime_ns for d in out.glob("**/done.json") for p in d.parent.iterdir()
    }
    again = start_recipe(out, EXTRA="--save_every 1").wait(timeout=900)
    return stopped, first, finished, again


class Scenario:
    """stopped_and_continued in a process of its own (threads beside the tests would make their
    forked processes unsafe): its result, once it has ended."""

    def __init__(self, out, stop):
        self.path = f"{out}.json"
        cmd = [sys.executable, __file__, str(out), stop.__name__]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)

    def value(self, timeout=1800):
        assert self.proc.wait(timeout) == 0
        stopped, first, finished, again = json.load(open(self.path))
        return stopped, first, finished, again


@pytest.fixture(scope="session", autouse=True)
def recipe(request, tmp_path_factory):
    """`bash train.sh`'s toy recipe (test_recipe.py), started when the session starts if that test
    is collected: it is mostly process start-ups, one or two at a time, so the other tests run
    beside it. (out, process, output, the recipe stopped in its DFT stage and continued, the recipe
    stopped between stages and continued: Scenario processes)."""
    if not any(item.module.__name__ == "test_recipe" for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("recipe")
    proc = start_recipe(out / "toy")
    in_dft = Scenario(out / "in-dft", stop_in_the_dft_stage)
    between = Scenario(out / "between", stop_between_stages)
    yield out, proc, out / "toy.txt", in_dft, between
    for p in [in_dft.proc, between.proc]:  # the session ended first (a failure, -x): each stops
        if p.poll() is None:  # its train.sh runs
            p.terminate()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":  # a Scenario: python conftest.py OUT STOP
    import pathlib

    where, stop = pathlib.Path(sys.argv[1]), globals()[sys.argv[2]]
    signal.signal(signal.SIGTERM, stop_all)  # the session ended first (a failure, -x)
    with open(f"{where}.json", "w") as f:
        json.dump(stopped_and_continued(where, stop), f)


# Helpers the test files share


def args(toy, stage, out, *extra):
    data = "pretrain" if stage in ("pt", "dpt") else "sft"
    return [
        "train",
        "--stage",
        stage,
        "--data",
        f"{toy}/data/{data}.json",
        "--images",
        f"{toy}/data/images",
        "--out",
        str(out),
        "--workers",
        "0",
        "--global_batch_size",
        "16",
        "--batch_size",
        "8",
        *extra,
    ]


def logits(model, input_ids, attention_mask, z_v):
    """The logits [B, T, V] of llava_kd's forward (compared with the stock model's)."""
    return model.lm_head(llava_kd.llava_hidden(model, input_ids, attention_mask, z_v))


def weights(d):  # by module name (the file on disk keeps transformers' older key names)
    return transformers.LlavaForConditionalGeneration.from_pretrained(d).state_dict()


def changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def start(cmd, env=None):
    """A command's process, its output in a file (a pipe nobody reads while another process is
    awaited can fill)."""
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    p.log = log
    return p


class Forked:
    """`python llava_kd.py argv` (or another script's main) with env's variables, in a process
    forked from this one: all a new interpreter would add is its imports of torch and transformers,
    ~8 s of CPU a process here (test_errors.py, train.sh and the two-node test start the command
    line itself). Popen's pid, wait, send_signal, kill and returncode; the output in .log."""

    def __init__(self, argv, env, main=llava_kd.main):
        self.log = tempfile.TemporaryFile("w+")
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:
            self.child(argv, env, main)

    def child(self, argv, env, main):
        code = 1
        try:
            os.environ.update(env)
            os.dup2(self.log.fileno(), 1)
            os.dup2(self.log.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = sys.stdout
            main(argv)
            code = 0
        except SystemExit as e:  # as the interpreter ends on one: a message is printed, exit 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = 1 if isinstance(e.code, str) else e.code or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)

    def wait(self, timeout=None):
        deadline = time.time() + (timeout or math.inf)
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.time() > deadline:
                self.kill()
                raise TimeoutError(f"process {self.pid} still running after {timeout} s")
            else:
                time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum):
        os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def launch(argv, env=None):
    """llava_kd.py argv in a new process: forked (above), or where this process has started CUDA
    (a forked child cannot), a new interpreter."""
    if torch.cuda.is_initialized():
        return start([sys.executable, "llava_kd.py", *argv], dict(os.environ, **(env or {})))
    return Forked(argv, env or {})


def torchrun(*argv, nproc=2, extra=()):
    return [
        start(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *(extra or ["--standalone"]),
                f"--nproc_per_node={nproc}",
                "llava_kd.py",
                *argv,
            ]
        )
    ]


def processes(*argv, nproc=2):
    """nproc processes of `llava_kd.py argv` (launch) with the variables torchrun gives its
    workers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    return [launch(argv, dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nproc)]


def ended(procs, timeout=300):
    """Each process's output, once it has ended."""
    outs = []
    for p in procs:
        p.wait(timeout)
        p.log.seek(0)
        outs.append(p.log.read())
    return outs


def finish(*runs):  # each process's output; each ended well
    procs = [p for run in runs for p in run]
    outs = ended(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def alone(fn, *args):
    """fn(*args) in a forked process with a process group of one (gloo): the test process itself
    never starts one, so the processes it forks later hold no c10d state of it."""

    def child(argv):
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init = f"tcp://127.0.0.1:{port}"
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        try:
            fn(*args)
        finally:
            dist.destroy_process_group()

    (output,) = ended([Forked([], {}, child)], timeout=300)
    assert output.rstrip().endswith("passed"), output


def sft(toy, ckpts, out, *extra):
    common = ["--init", str(ckpts / "student"), "--lr", "1e-3", "--save_every", "1000"]
    return args(toy, "sft", out, *common, *extra)


def refused(argv):
    with pytest.raises(SystemExit) as e:
        llava_kd.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def logged_steps(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(models, "tower_from_llava", refuse)


def logged(out):
    path = out / "log.jsonl"
    return [json.loads(line)["step"] for line in open(path)] if path.exists() else []

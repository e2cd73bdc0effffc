import os
import signal
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may come from a model hub
# tiny models: a second thread only spins, beside the recipe's processes
os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytest  # noqa: E402
import tqdm  # noqa: E402
import transformers  # noqa: E402

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

    import llava_kd
    import runtime

    out = tmp_path_factory.mktemp("ckpts")
    for name in ("teacher", "student"):
        torch.manual_seed(0)
        model, proc = llava_kd.build_student(f"{toy}/vision", f"{toy}/{name}_llm")
        runtime.save_checkpoint_files(model, proc, out / name)
    return out


def pytest_collection_modifyitems(items):
    """test_recipe.py's test last: its train.sh (the fixture below) runs beside all the others."""
    items.sort(key=lambda item: item.module.__name__ == "test_recipe")


@pytest.fixture(scope="session", autouse=True)
def recipe(request, tmp_path_factory):
    """`bash train.sh`'s toy recipe (test_recipe.py), started when the session starts if that test
    is collected: it is mostly process start-ups, one or two at a time, so the other tests run
    beside it. (out, process, output)."""
    if not any(item.module.__name__ == "test_recipe" for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("recipe")
    env = dict(
        os.environ,
        OUT=str(out / "toy"),
        SEEDS="1",
        TOY_STEPS="2",
        TOY_QUICK="1",
        NGPU="1",
        TOY_SEED="1",
        PYTHON=sys.executable,  # train.sh runs the Python that runs the tests
    )
    with open(out / "output.txt", "w") as f:
        proc = subprocess.Popen(
            ["bash", "train.sh"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    yield out, proc, out / "output.txt"
    if (
        proc.poll() is None
    ):  # the session ended first (a failure, -x): stop train.sh and the stages it started
        os.killpg(proc.pid, signal.SIGKILL)

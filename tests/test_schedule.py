"""Schedules and counts, as properties over many drawn cases: every sample at most once an epoch
and as many whole steps as the schedule counts, on every process, grouped by length or not; a run
asked for more steps than its schedule has ends with the schedule."""

import json
import random

import pytest
from conftest import logged_steps, sft

import checkpoints
import data
import llava_kd


class Rows:
    """What epoch_order reads of a data set: its rows (id, image or None, turns)."""

    def __init__(self, n, rng):
        text = rng.random()  # the share of text-only samples
        self.rows = [
            (
                f"s{i}",
                None if rng.random() < text else "x.png",
                [{"value": "w" * rng.randint(1, 800)}],
            )
            for i in range(n)
        ]
        self.n_image_tokens = rng.choice([1, 49, 729])

    def __len__(self):
        return len(self.rows)


def test_every_epoch_order_gives_each_process_its_whole_steps_and_each_sample_once():
    rng = random.Random(0)
    for draw in range(300):
        world, batch, accum = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        global_batch = world * batch * accum
        ds = Rows(rng.randint(global_batch, 12 * global_batch), rng)
        grouped, seed, epoch = rng.random() < 0.5, rng.randint(0, 9), rng.randint(0, 3)
        steps = len(ds) // global_batch  # the schedule's steps an epoch (wire)
        per_step = accum * batch
        case = (draw, len(ds), world, batch, accum, grouped)

        every = []
        for rank in range(world):
            order = data.epoch_order(ds, global_batch, batch, world, rank, seed, epoch, grouped)
            again = data.epoch_order(ds, global_batch, batch, world, rank, seed, epoch, grouped)
            assert order == again, case  # from the seed and the epoch alone: resumable
            assert len(order) >= steps * per_step, case  # the loop's slice is whole
            every.append(order[: steps * per_step])  # as micro_batches slices it
        taken = [i for order in every for i in order]
        assert len(taken) == len(set(taken)) == steps * global_batch, case
        assert all(0 <= i < len(ds) for i in taken), case
        if not grouped:
            continue
        mixed = 0
        for s in range(steps):  # one kind a step, but for one step of what is left of both
            step = [i for order in every for i in order[s * per_step : (s + 1) * per_step]]
            mixed += len({ds.rows[i][1] is None for i in step}) > 1
        assert mixed <= 1, case


def test_more_steps_asked_than_the_schedule_has_end_with_the_schedule(toy, ckpts, tmp_path):
    """--max_steps beyond the schedule (6 steps of 16 of 100 samples): 6 steps, the whole schedule
    (its lr decayed to 0, its checkpoint dropped as for any finished stage)."""
    out = tmp_path / "out"
    llava_kd.main(sft(toy, ckpts, out, "--max_steps", "50", "--auto_resume"))
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    done = json.load(open(out / checkpoints.DONE))
    assert done["step"] == 6 and done["finished"]
    assert not (out / "checkpoint").exists()
    lrs = [json.loads(line)["lr"] for line in open(out / "log.jsonl")]
    assert lrs[-1] == pytest.approx(llava_kd.lr_at(5, 6, 1e-3, 0.03))


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. "),
        ConnectionResetError(104, "Connection reset by peer"),
        EOFError(),
    ],
    ids=["the loader says so", "its connection breaks", "its pipe ends"],
)
def test_a_dead_loader_worker_is_one_error_batch_however_it_shows(error):
    """A worker that dies is found by the loader (a RuntimeError naming it) or, when it died handing
    over a batch, by the connection to it breaking: either way the step gets one micro-batch naming
    it (the loop then checkpoints the last whole step), not a traceback."""

    def batches():
        yield dict(errors=[])
        raise error

    (micro,) = data.next_micro_batches(batches(), 2)
    assert "DataLoader worker" in micro["errors"][0] and micro["fix"] == "--resume"

    def broken():
        raise RuntimeError("another error")
        yield

    with pytest.raises(RuntimeError, match="another error"):  # any other error is raised
        data.next_micro_batches(broken(), 1)

"""The held-out set in the loop (--eval_data): every loss term of the stage, under no_grad, on a
LLaVA file that training never reads, every --eval_every steps and at the end. Each process takes
its share (rank, rank + world, ...); the sums are divided once by the whole set's counts, as a
training step divides by its global batch's: N processes log what one would, and a record equals
the training loss of the same weights on the same rows."""

import functools
import itertools
import math
import types

import torch
import torch.distributed as dist

import data
import errors


def read(a, processor, source, is_chat, rank, world):
    """--eval_data's samples, with the checks --data gets before any weights load (read_samples;
    every answer's length by the processor of the checkpoint, when there is one): (samples, this
    process's left-out indices, None when not yet checked), or None without --eval_data."""
    if not a.eval_data or a.plan_gpus:
        return None
    samples = data.read_samples(a.eval_data, a.eval_images or a.images[0], rank, world)
    if len(samples) < world:
        raise errors.UserError(
            f"--eval_data {a.eval_data}: {len(samples)} sample(s) for {world} processes; give it "
            f"at least one a process"
        )
    if processor is None:  # a new student: its processor comes with its weights (held_out_set)
        return samples, None
    lengths = (processor, source, a, is_chat, samples, rank, world)
    return samples, data.check_lengths(*lengths, path=a.eval_data)


def held_out_set(a, processor, is_chat, read_out, rank, world):
    """The held-out data set and this process's share of it (the indices rank, rank + world, ...
    less those --drop_too_long leaves out), or None without --eval_data."""
    if read_out is None:
        return None
    samples, left_out = read_out
    ds = data.LlavaDataset(a.eval_data, None, processor, is_chat, a.max_length, samples)
    if left_out is None:
        left_out = ds.check_lengths(rank, world, a.drop_too_long)
    gone = set(left_out)
    mine = [i for i in range(rank, len(ds), world) if i not in gone]
    return types.SimpleNamespace(ds=ds, mine=mine)


def stand_in(pad_id):
    """A one-token text-only micro-batch, run where a process's share has ended: every process runs
    as many forwards (FSDP2 gathers the weights in each, DDP sends its buffers). Not counted."""
    row = dict(id="", input_ids=torch.tensor([pad_id]), labels=torch.tensor([data.IGNORE]))
    return data.collate([dict(row, pixel_values=None)], pad_id)


def collate_readable(rows, pad_id):
    """(data.collate of the rows whose image decoded, or None; the others' errors)."""
    readable = [r for r in rows if "error" not in r]
    batch = data.collate(readable, pad_id) if readable else None
    return batch, [r["error"] for r in rows if "error" in r]


def evaluate(held_out, loss_of, counts_of, weights, model, a, cuda, step):
    """log.jsonl's eval record after `step` steps: eval_loss and each term (eval_L_reg, ...),
    each a mean over the held-out set's rows of its kind. loss_of(batch): stage_loss's (loss,
    terms) with counts of 1 (the terms are sums); counts_of(batch): each term's rows; weights:
    each term's weight in the loss, by name. Images are read in this process (no loader worker
    to die mid-run); one that does not decode is noted and left out."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    ds = held_out.ds
    n_batches = math.ceil(math.ceil(len(ds) / world) / a.batch_size)  # the same on every process
    pad_id = ds.tok.pad_token_id
    collate = functools.partial(collate_readable, pad_id=pad_id)
    # a generator of its own: the loader's seed is not drawn from torch's, so the dropout of a model
    # that has some draws what it would without --eval_data
    options = dict(batch_size=a.batch_size, collate_fn=collate, pin_memory=cuda)
    options["generator"] = torch.Generator()
    loader = torch.utils.data.DataLoader(ds, sampler=held_out.mine, **options)
    batches = itertools.chain(loader, itertools.repeat((None, [])))
    names = list(weights)
    device = model.lm_head.weight.device
    sums = torch.zeros(2 * len(names) + 1, dtype=torch.float64, device=device)  # terms, counts, n
    zero = sums.new_zeros(())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad(), autocast:
        for batch, unread in itertools.islice(batches, n_batches):
            for error in unread:
                fix = f"replace it or remove the sample from --eval_data {a.eval_data}"
                print(f"note: {error}: left out of the held-out losses at step {step}; {fix}")
            _, terms = loss_of(stand_in(pad_id) if batch is None else batch)
            if batch is not None:
                found = [terms[k].double() if k in terms else zero for k in names]
                sums[: len(names)] += torch.stack(found)
                counts = counts_of(batch) + [len(batch["input_ids"])]
                sums[len(names) :] += torch.tensor(counts, dtype=torch.float64, device=device)
    for m, training in modes:
        m.train(training)
    if world > 1:
        dist.all_reduce(sums)
    host = sums.tolist()
    means = [s / max(c, 1.0) for s, c in zip(host, host[len(names) : 2 * len(names)])]
    rec = dict(step=step, eval_loss=sum(weights[k] * x for k, x in zip(names, means)))
    rec.update({f"eval_{k}": x for k, x in zip(names, means)})
    rec["eval_samples"] = int(host[-1])
    return rec

"""LLaVA-format data -> input_ids, labels, pixel_values; the collate.

A LLaVA JSON file is a list of {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"},
...]}; "image" is a path relative to the image folder and "<image>" marks where it goes in the first
human turn.
"""

import array
import functools
import hashlib
import json
import os
import signal

import torch
import transformers
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

import chat
import errors
import processes
import signals

IGNORE = -100  # label of every position that is not an answer token: no loss is taken there
CACHED = 4096  # rows whose tokens a data set keeps (LlavaDataset.tokens)


def image_seq_length(processor):
    """Visual tokens per image: what LlavaProcessor expands <image> to (patches, + CLS, - 1 for
    "default")."""
    image = Image.new("RGB", (8, 8))
    h, w = processor.image_processor(image, return_tensors="pt")["pixel_values"].shape[-2:]
    p = processor.patch_size
    n = (h // p) * (w // p) + processor.num_additional_image_tokens
    return n - (processor.vision_feature_select_strategy == "default")


def read_samples(json_path, image_folder, rank=0, world=1):
    """Every sample of a LLaVA JSON file (a list, or JSON Lines; a UTF-8 BOM skipped), checked:
    [(id, image path or None, turns)]. One UserError names the file and each bad sample's id; a
    missing or misplaced <image> goes first in the first turn; each process opens its share's."""
    try:
        with open(json_path, encoding="utf-8-sig") as f:
            text = f.read()
        try:
            rows = json.loads(text)
        except ValueError:
            if text.lstrip().startswith(("[", "{")) and "\n{" not in text.strip():  # one value
                raise  # with an error in it: say where
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines
    except (OSError, ValueError) as e:
        raise errors.UserError(
            f"{json_path}: not a readable LLaVA JSON list of samples ({e})"
        ) from e
    if not isinstance(rows, list):
        found = f"an object with keys {list(rows)[:8]}" if isinstance(rows, dict) else repr(rows)
        raise errors.UserError(
            f'{json_path}: {found[:200]}, where a JSON list of samples belongs ([{{"id", '
            f'"image", "conversations"}}, ...]; or JSON Lines, one sample a line)'
        )
    samples, problems, moved = [], [], [0]
    for i, row in enumerate(rows):
        try:
            samples.append(_check(row, i, image_folder, moved, i % world == rank))
        except errors.UserError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise errors.UserError(f"{json_path}: {problems[0]}")
    if problems:
        raise errors.UserError(
            f"{json_path}: {len(problems)} bad sample(s), fix or remove them:\n  "
            + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else "")
        )
    if moved[0] and rank == 0:  # every process counts every sample
        print(
            f"{json_path}: put <image> at the start of the first human turn in {moved[0]} sample(s)"
        )
    return samples


def read_sources(paths, folders, rank=0, world=1):
    """Every --data file's samples (read_samples) in one list, each file's images under its folder
    (or the one folder); with several files an id is "path:id": unique, and it names the file."""
    folders = folders * len(paths) if len(folders) == 1 else folders
    samples = []
    for path, folder in zip(paths, folders):
        found = read_samples(path, folder, rank, world)
        if len(paths) > 1:
            found = [(f"{path}:{sid}", image, conv) for sid, image, conv in found]
        samples += found
    return samples


def label(paths):
    """What messages call the data: its file, or --data (each sample's id then names its file)."""
    return paths[0] if len(paths) == 1 else "--data"


def sources_sha256(paths):
    """What the --data files hold, whatever their paths, in their order (one file: its SHA-256): a
    checkpoint is continued on the same samples."""
    digests = []
    for path in paths:
        with open(path, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    joined = hashlib.sha256(" ".join(digests).encode()).hexdigest()
    return digests[0] if len(digests) == 1 else joined


def _check(row, i, image_folder, moved, open_image):
    sid = row.get("id", f"#{i}") if isinstance(row, dict) else f"#{i}"
    conv = row.get("conversations") if isinstance(row, dict) else None
    if not conv:
        raise errors.UserError(f"sample {sid}: empty or missing 'conversations'")
    if len(conv) % 2 or any(
        not isinstance(c, dict)
        or c.get("from") != ("human", "gpt")[j % 2]
        or not isinstance(c.get("value"), str)
        for j, c in enumerate(conv)
    ):
        raise errors.UserError(
            f"sample {sid}: turns must alternate human/gpt, start with human, end with gpt"
        )
    for c in conv:
        try:
            c["value"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise errors.UserError(
                f"sample {sid}: text that is not valid Unicode ({e.reason})"
            ) from None
    if any(not c["value"].strip() for c in conv[1::2]):
        raise errors.UserError(
            f"sample {sid}: an empty answer (it would train on the end token alone)"
        )
    conv = [dict(c) for c in conv]
    n_tags = sum(c["value"].count("<image>") for c in conv)
    image = row.get("image")
    if image is None:
        if n_tags:
            raise errors.UserError(f"sample {sid}: <image> in the text of a sample with no 'image'")
        return sid, None, conv
    if not isinstance(image, str) or n_tags > 1:
        raise errors.UserError(
            f"sample {sid}: one image per sample is supported ('image' must be one path)"
        )
    path = os.path.join(image_folder, image)
    if open_image and not os.path.isfile(path):
        raise errors.UserError(
            f"sample {sid}: image file {path} not found (is --images the folder the paths "
            f"in the JSON are relative to?)"
        )
    if open_image:
        check_image(path, sid)
    if not conv[0]["value"].startswith("<image>"):  # LLaVA: the image opens the first human turn
        moved[0] += 1
        conv[0]["value"] = (
            "<image>\n" + "".join(c["value"].replace("<image>", "") for c in conv[:1]).strip()
        )
        for c in conv[1:]:  # the tag's turn as if it had never held it
            if "<image>" in c["value"]:
                c["value"] = c["value"].replace("<image>", "").strip()
    return sid, path, conv


def check_image(path, sid):
    """The image's header: its format and size (PIL reads no pixels for it)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, Image.DecompressionBombError) as e:
        raise errors.UserError(f"sample {sid}: image file {path} cannot be read ({e})") from None
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise errors.UserError(
            f"sample {sid}: image file {path} has {width * height / 1e6:.0f} megapixels, above "
            f"PIL's limit for untrusted images ({Image.MAX_IMAGE_PIXELS / 1e6:.0f}): resize it"
        )


class LlavaDataset(torch.utils.data.Dataset):
    """chat=False: the pretraining template  <image tokens> caption <eos>, labels on caption + eos.
    chat=True: the saved processor's chat template, labels on every assistant turn and its
    end-of-turn token. samples: read_samples(json_path, image_folder) when already read (train
    checks the data before loading any weights); otherwise the file is read and checked here."""

    def __init__(self, json_path, image_folder, processor, chat, max_length, samples=None):
        self.json_path = json_path
        self.chat = chat
        self.max_length = max_length
        self.processor, self.tok = processor, processor.tokenizer
        self.image_token, self.image_token_id = processor.image_token, processor.image_token_id
        self.n_image_tokens = image_seq_length(processor)
        self.template = processor.chat_template or self.tok.chat_template
        if chat and not self.template:
            raise errors.UserError(
                f"{json_path}: sft/dft render conversations with the model's chat template, and "
                f"its processor and tokenizer have none"
            )
        self.rows = read_samples(json_path, image_folder) if samples is None else samples
        self.cached = {}  # tokens(): the first CACHED rows' tokens

    def __len__(self):
        return len(self.rows)

    def check_lengths(self, rank=0, world=1, drop=False):
        """This process's share tokenized, no image read: a sample with no answer token within
        max_length is refused by id (drop: noted, and its index returned); a cut answer noted."""
        refused, cut, left_out = [], [], []
        for i in range(rank, len(self.rows), world):
            sid, image, _ = self.rows[i]
            ids, labels = self.tokens(i)
            shift = self.n_image_tokens - 1 if image is not None else 0  # <image> -> n tokens
            answer = [j + shift for j, label in enumerate(labels) if label != IGNORE]
            problem = None
            if not answer:  # a template that marks no answer
                problem = "no answer token at all"
            elif answer[0] >= self.max_length:
                problem = f"needs {answer[0] + 1}"
            elif answer[-1] >= self.max_length:
                cut.append(sid)
            if problem:
                refused.append(f"{sid} ({problem})")
                left_out.append(i)
        where = f"{self.json_path}: {{n}} sample(s) have no answer token within --max_length"
        where += f" {self.max_length}"
        if refused and not drop:
            raise errors.UserError(
                f"{where.replace('{n}', str(len(refused)))}: {', '.join(refused[:10])}"
                f"{' ...' if len(refused) > 10 else ''}; raise --max_length, remove them, or leave "
                f"them out with --drop_too_long"
            )
        if left_out:
            ids = [self.rows[i][0] for i in left_out]
            errors.note(f"note: {where}: left out (--drop_too_long), e.g. {{ids}}", ids)
        if cut:
            limit = f"--max_length {self.max_length} (their end token is not trained)"
            errors.note(
                f"note: {self.json_path}: {{n}} answer(s) cut short by {limit}, e.g. {{ids}}", cut
            )
        return left_out

    def _plain(self, conv, has_image):
        caption = self.tok(conv[1]["value"].strip(), add_special_tokens=False)["input_ids"]
        caption = caption + [self.tok.eos_token_id]
        prompt = [self.image_token_id] if has_image else []
        return prompt + caption, [IGNORE] * len(prompt) + caption

    def _chat(self, conv):
        msgs = [
            {"role": ("user", "assistant")[j % 2], "content": c["value"]}
            for j, c in enumerate(conv)
        ]
        text, spans = chat.render(self.tok, self.template, msgs), []
        # the character span of each assistant answer and its end-of-turn token
        for j in range(1, len(msgs), 2):
            start = len(chat.render(self.tok, self.template, msgs[:j], generation_prompt=True))
            upto = chat.render(self.tok, self.template, msgs[: j + 1])
            if not text.startswith(upto):
                raise errors.UserError(
                    "the chat template does not render a conversation's turns as prefixes of it"
                )
            spans.append((start, start + len(upto[start:].rstrip())))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            t if any(s <= a and b <= e for s, e in spans) else IGNORE
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        return enc["input_ids"], labels

    def tokens(self, i):
        """Row i's token ids and labels, <image> one token. The first CACHED rows asked for are kept
        (~6 KB a row of 700 tokens): a small data set is rendered once, not once an epoch."""
        if i in self.cached:
            ids, labels = self.cached[i]
            return list(ids), list(labels)
        _, image, conv = self.rows[i]
        ids, labels = self._chat(conv) if self.chat else self._plain(conv, image is not None)
        if len(self.cached) < CACHED:
            self.cached[i] = (array.array("i", ids), array.array("i", labels))
        return ids, labels

    def __getitem__(self, i):
        sid, image, _ = self.rows[i]
        ids, labels = self.tokens(i)
        pixel_values = None
        # one <image> token -> n_image_tokens of them, never cut by truncation
        if image is not None:
            k, n = ids.index(self.image_token_id), self.n_image_tokens
            if k + n >= self.max_length:
                raise errors.UserError(
                    f"--max_length {self.max_length} leaves no room for text after the {n} image "
                    f"tokens of sample {sid} in {self.json_path}: raise --max_length"
                )
            ids = ids[:k] + [self.image_token_id] * n + ids[k + 1 :]
            labels = labels[:k] + [IGNORE] * n + labels[k + 1 :]
            try:
                with Image.open(image) as im:
                    img = im.convert("RGB")
            except (OSError, Image.DecompressionBombError) as e:  # the header was fine
                error = f"{self.json_path}: sample {sid}: cannot decode image {image} ({e})"
                return {"id": sid, "error": error}  # the loop saves a checkpoint and stops
            processed = self.processor.image_processor(img, return_tensors="pt")
            pixel_values = processed["pixel_values"][0]
        # truncation cuts text from the end
        ids = ids[: self.max_length]
        labels = labels[: self.max_length]
        return {
            "id": sid,
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values,
        }


def collate(rows, pad_token_id):
    """Right padding; attention_mask marks real tokens (Qwen's pad id is also an end token, so
    padding is known by the mask, never by id); pixel_values stacks the images of the rows that have
    one, in order. errors: the rows whose image did not decode (then nothing else)."""
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {"errors": errors}
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.full((B, T), pad_token_id),
        "labels": torch.full((B, T), IGNORE),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
    }
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][b, :n] = r["input_ids"]
        out["labels"][b, :n] = r["labels"]
        out["attention_mask"][b, :n] = 1
    images = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
    out["pixel_values"] = torch.stack(images) if images else None
    out["errors"] = []
    return out


def loader_batches(loader):
    """The loader's batches. A worker that dies (the OOM killer takes them first) is found when its
    batch is due, not by torch's SIGCHLD handler (anywhere in a step): the last whole step stays."""
    batches = iter(loader)
    if loader.num_workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield from batches


def epoch_order(ds, global_batch, batch, world, rank, seed, epoch, grouped=False):
    """This process's sample indices of one epoch, in order, from the seed and the epoch alone (a
    resumed run sees what an uninterrupted one would): floor(N / global_batch) optimizer steps, each
    sample in at most one. Shuffled as DistributedSampler shuffles; grouped, as LLaVA's
    group_by_modality_length: image and text-only samples apart, each step's sorted by length."""
    if not grouped:
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(ds), generator=g).tolist()
    # a length from the text alone (characters / 4) and the image's tokens: no tokenizing
    length = [
        sum(len(t["value"]) for t in conv) // 4 + (image is not None) * ds.n_image_tokens
        for _, image, conv in ds.rows
    ]
    kinds = [[i for i in perm if (ds.rows[i][1] is None) == text] for text in (False, True)]
    steps, rest = [], []
    for kind in kinds:  # whole optimizer steps of one kind
        whole = len(kind) // global_batch * global_batch
        steps += [kind[s : s + global_batch] for s in range(0, whole, global_batch)]
        rest += kind[whole:]
    whole = len(rest) // global_batch * global_batch  # then what is left of both, mixed
    steps += [rest[s : s + global_batch] for s in range(0, whole, global_batch)]
    order = []
    for k in torch.randperm(len(steps), generator=g).tolist():
        step = sorted(steps[k], key=lambda i: -length[i])  # micro-batch j: process j % world
        micro = [step[j : j + batch] for j in range(0, global_batch, batch)]
        order += [i for m in micro[rank::world] for i in m]
    return order


def loader_workers(asked):
    """--workers, or the CPUs this process may run on, shared by its node's processes, less one for
    the process itself, 8 at most (an image takes ~22 ms to decode and process: 8 a micro-batch)."""
    if asked is not None:
        return asked
    cpus = len(os.sched_getaffinity(0)) // processes.per_node()
    return max(0, min(8, cpus - 1))


def micro_batches(ds, order_of, per_step, steps_per_epoch, step, loader):
    """This process's micro-batches from optimizer step `step` on: order_of(epoch) is this
    process's indices of an epoch (epoch_order), per_step how many of them a step takes; loader
    holds the DataLoader's other arguments (loader_options)."""
    while True:
        epoch, skip = divmod(step, steps_per_epoch)
        order = order_of(epoch)[skip * per_step : steps_per_epoch * per_step]
        yield from loader_batches(torch.utils.data.DataLoader(ds, sampler=order, **loader))
        step = (epoch + 1) * steps_per_epoch


def loader_options(batch_size, pad_token_id, workers, pin):
    """The DataLoader's arguments: micro-batches collated with this pad id, loader_workers(workers)
    processes that leave the signals to the training process, pinned memory on CUDA (copied
    without the host waiting)."""
    return dict(
        batch_size=batch_size,
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id),
        num_workers=loader_workers(workers),
        worker_init_fn=signals.ignore_signals,
        pin_memory=pin,
    )


def next_micro_batches(batches, n):
    """The next n micro-batches, or one that names a dead loader worker as its error: the loader
    says so, or, when the worker died while handing over a batch's shared memory, the connection
    to it breaks."""
    try:
        return [next(batches) for _ in range(n)]
    except (RuntimeError, ConnectionError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, RuntimeError) and not first.startswith("DataLoader worker"):
            raise
        died = first if isinstance(e, RuntimeError) else f"a DataLoader worker died ({e!r})"
        why = f"{died} (if the host ran out of memory: fewer --workers)"
        return [dict(errors=[why], fix="--resume")]


def check_lengths(processor, source, a, is_chat, samples, rank, world, path=None):
    """Every answer's length (LlavaDataset.check_lengths) of the samples of `path` (--data's by
    default) with the processor of the checkpoint `source` alone: no weights read."""
    chat.prepare_chat(processor, transformers.GenerationConfig(), source, end_is_eos=is_chat)
    ds = LlavaDataset(path or label(a.data), None, processor, is_chat, a.max_length, samples)
    return ds.check_lengths(rank, world, a.drop_too_long)


def leave_out(ds, indices, global_batch, out, master):
    """--drop_too_long: the samples that check_lengths left out (every process's), gone from ds on
    every process alike; their ids in out/left_out.json."""
    gone = set(indices)
    ids = [row[0] for i, row in enumerate(ds.rows) if i in gone]
    ds.rows = [row for i, row in enumerate(ds.rows) if i not in gone]
    if master:
        with open(os.path.join(out, "left_out.json"), "w") as f:
            json.dump(ids, f)
    if len(ds) < global_batch:
        raise errors.agreed_error(
            f"{ds.json_path}: {len(ds)} samples are left, fewer than one global batch "
            f"({global_batch}), once --drop_too_long left out {len(ids)}"
        )

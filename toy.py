"""The toy: tiny real checkpoints (a SigLIP, a teacher and a student Qwen2) trained here, offline,
on the data of toy_data.py; its eval and its table. Not part of the method.

    python toy.py setup --out runs/toy/setup [--seed N]  # data, tokenizer, tower, both LLMs
    python toy.py eval --model DIR [DIR ...] --data JSON --images DIR [--results F --row NAME ...]
                       [--prior TRAIN_JSON]  # and first, the question-only prior
    python toy.py table --results F [F ...] --out table.md  # several runs: their seeds pooled

The teacher knows more than its students' labels say: its LLM read about every kind of object
(the student's about a third), and it is trained on 12x the students' labelled rows, each answer of
which an annotator got wrong 3 times in 10. docs/toy.md has the design and its draws.
"""

import argparse
import collections
import concurrent.futures
import functools
import json
import os
import random

import torch
import transformers

import checkpoints
import data
import errors
import flags
import models
from toy_data import COLOURS, PLACES, SHAPES, SIZES, draw, make_toy_data, scene

QUICK = dict(
    n_pretrain=64, n_sft=100, n_teacher_sft=100, n_test=2, n_text=64, n_heldout=8, steps=(2, 2, 2)
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' "
    "}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# the teacher 7x the student in non-embedding parameters (the paper's ratio); vocabularies padded
# differently, as in real pairs
TOY_LLMS = {
    "teacher_llm": dict(
        hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, pad=64
    ),
    "student_llm": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, pad=16
    ),
}


def bpe(texts, vocab_size, special_tokens=()):
    """A byte-level BPE tokenizer (the tokenizers library's) trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return tk


def toy_tokenizer(texts):
    """400 entries trained on the toy texts, Qwen's special tokens and <image>."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tk = bpe(texts, 400, specials)
    eos = "<|endoftext|>"
    kw = dict(eos_token=eos, pad_token=eos, chat_template=CHATML)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def real_ids_tokenizer(texts, n_regular, specials, added=(), first=(), **kw):
    """A byte-level BPE trained on texts, with the real checkpoints' special token ids: `first` at
    0, 1, ... (Llama's <unk> <s> </s>), its vocabulary filled up to n_regular entries, then
    `specials` and `added`."""
    from tokenizers import Tokenizer

    spec = json.loads(bpe(texts, 300).to_str())
    vocab = {t: i for i, t in enumerate(first)}
    vocab.update({t: i + len(first) for t, i in spec["model"]["vocab"].items()})
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), n_regular)})
    spec["model"]["vocab"] = vocab
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.add_special_tokens(list(first) + list(specials) + list(added))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def patch_quadrants(grid):
    """The quadrant (a PLACES entry) of each patch of a grid x grid image, row-major."""
    return [
        PLACES[2 * (r >= grid // 2) + (c >= grid // 2)] for r in range(grid) for c in range(grid)
    ]


def patch_targets(objects, quadrant, names):
    """Per patch: its quadrant's shape, colour and size (0: nothing there), and the quadrant."""
    at = {o["place"]: o for o in objects}
    keys = ("shape", "colour", "size")
    return [
        [n.index(at[q][k]) if q in at else 0 for n, k in zip(names, keys)] + [PLACES.index(q)]
        for q in quadrant
    ]


def train_vision(out, seed, steps, batch=64, layer=-2):
    """A SigLIP trained as SigLIP is pretrained, then frozen: every patch token of the layer LLaVA
    reads predicts what is in its quadrant and which quadrant it is (real SigLIP features keep where
    a patch is)."""
    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    tower = transformers.SiglipVisionModel(cfg)
    processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    rng = random.Random(seed + 1)
    names = [("none",) + SHAPES, ("none",) + tuple(COLOURS), ("none",) + SIZES, PLACES]
    head = torch.nn.Linear(cfg.hidden_size, sum(map(len, names)))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=2e-3)
    quadrant = patch_quadrants(cfg.image_size // cfg.patch_size)
    for _ in range(steps):
        scenes = [scene(rng) for _ in range(batch)]
        target = torch.tensor([patch_targets([s], quadrant, names) for s in scenes])
        pixels = torch.stack(
            [processor(draw(s), return_tensors="pt")["pixel_values"][0] for s in scenes]
        )
        h = tower(pixels, output_hidden_states=True).hidden_states[layer]
        logits = head(h).split([len(n) for n in names], -1)
        parts = [(part.flatten(0, 1), target[..., i].flatten()) for i, part in enumerate(logits)]
        loss = sum(torch.nn.functional.cross_entropy(x, y) for x, y in parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.save_pretrained(os.path.join(out, "vision"))
    processor.save_pretrained(os.path.join(out, "vision"))


def pretrain_llm(out, name, seed, steps, batch=32, lr=3e-3):
    """A Qwen2 of TOY_LLMS trained on its text alone (text.json): fact sentences (ending on eos) and
    chat turns in which an object in words is followed by a question and its answer."""
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    docs = json.load(open(os.path.join(out, "data", "text.json")))[name]
    texts = []
    for d in docs:
        chat = [
            {"role": "user", "content": d["prompt"]},
            {"role": "assistant", "content": d["answer"]},
        ]
        texts += [d["text"] + tok.eos_token, tok.apply_chat_template(chat, tokenize=False)]
    torch.manual_seed(seed)
    c = dict(TOY_LLMS[name])
    pad = c.pop("pad")
    cfg = transformers.Qwen2Config(
        vocab_size=-(-len(tok) // pad) * pad,
        num_key_value_heads=c["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=name == "student_llm",
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        **c,
    )
    llm = transformers.Qwen2ForCausalLM(cfg)
    rng = random.Random(seed + 2)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        kw = dict(padding=True, return_tensors="pt", add_special_tokens=False)
        enc = tok(rng.sample(texts, min(batch, len(texts))), **kw)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = llm(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ends = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    llm.generation_config = transformers.GenerationConfig(eos_token_id=ends, pad_token_id=ends[0])
    llm.save_pretrained(os.path.join(out, name))
    tok.save_pretrained(os.path.join(out, name))


def make_toy(out, seed=0, steps=(150, 600, 400), workers=1, **sizes):
    """The toy setup, once for every student seed: the data and the tokenizer, then the tower and
    the teacher's and the student's LLMs (in `workers` processes side by side, the teacher's first:
    the longest)."""
    texts = make_toy_data(os.path.join(out, "data"), seed, **sizes)
    toy_tokenizer(texts).save_pretrained(os.path.join(out, "tokenizer"))
    parts = [
        functools.partial(pretrain_llm, out, "teacher_llm", seed, steps[1]),
        functools.partial(train_vision, out, seed, steps[0]),
        functools.partial(pretrain_llm, out, "student_llm", seed, steps[2]),
    ]
    if workers == 1:
        for part in parts:
            part()
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for job in [pool.submit(part) for part in parts]:
            job.result()


@torch.no_grad()
def evaluate(model_dir, data_json, images, batch_size=64):
    """Whether the greedy answer to each row's question is its answer exactly, one bool a row: the
    arg max at every answer token and at the end of the turn is that token (greedy decoding then
    writes the answer and stops), in one forward a batch."""
    model, processor = models.load_llava(model_dir)
    model.eval()
    ds = data.LlavaDataset(data_json, images, processor, chat=True, max_length=4096)
    ends = torch.tensor(model.generation_config.eos_token_id)
    right = []
    for i in range(0, len(ds), batch_size):
        rows = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
        b = data.collate(rows, processor.tokenizer.pad_token_id)
        labels = b.pop("labels")[:, 1:]
        b.pop("errors")
        predicted = model(**b).logits[:, :-1].argmax(-1)
        # the answer's tokens and its end (either end token stops generation); what the template
        # adds after it is not generated
        answer = labels != data.IGNORE
        is_end = torch.isin(labels, ends) & answer
        after_end = (is_end.cumsum(1) - is_end.long()) > 0
        ok = (predicted == labels) | (is_end & torch.isin(predicted, ends))
        right += (ok | ~answer | after_end).all(1).tolist()
    return right


def question_prior(train_json, test_json):
    """Exact match of the best answer from the question alone: the most frequent answer to the same
    question in the training rows (what a model that ignores the image can reach)."""
    answers = collections.defaultdict(collections.Counter)
    for r in json.load(open(train_json)):
        conv = r["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            answers[q["value"].replace("<image>\n", "")][a["value"]] += 1
    test = [r["conversations"][:2] for r in json.load(open(test_json))]
    best = {q: c.most_common(1)[0][0] for q, c in answers.items()}
    hits = [best.get(q["value"].replace("<image>\n", "")) == a["value"] for q, a in test]
    return sum(hits) / len(test)


def mean(xs):
    return sum(xs) / len(xs)


def sd(xs):  # the sample standard deviation (0 for a single value)
    return (sum((x - mean(xs)) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


KD, CONTROL = "student DPT-SFT-DFT (LLaVA-KD)", "student PT-SFT-SFT (no teacher)"
DIFFERENCES = (
    (KD, CONTROL),
    ("student PT-SFT-DFT", CONTROL),
    ("student DPT-SFT", "student PT-SFT"),
)


def read_results(paths):
    """{row: {(run, seed): accuracy %}} of one or more runs' results.jsonl."""
    rows = collections.defaultdict(dict)
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: no results file {path}: give a run's results.jsonl (in OUT)")
        for line in open(path):
            r = json.loads(line)
            rows[r["row"]][(path, r["seed"])] = 100 * r["accuracy"]
    return rows


def table(paths, out, seconds=None):
    """The paired differences seed by seed (both models of one from the same student seed: the
    draw's and the seed's luck cancel) with their standard errors, then every row's mean and
    standard deviation over seeds (over the runs' seeds pooled, given several runs)."""
    rows = read_results(paths)
    lines = ["| difference (paired by seed) | mean ± s.e. | per seed |", "| --- | --- | --- |"]
    for a, b in DIFFERENCES:
        d = [rows[a][k] - rows[b][k] for k in rows.get(a, {}) if k in rows.get(b, {})]
        if d:
            name = f"{a.removeprefix('student ')} - {b.removeprefix('student ')}"
            each = " ".join(f"{x:+.1f}" for x in d)
            lines.append(f"| {name} | {mean(d):+.1f} ± {sd(d) / len(d) ** 0.5:.1f} | {each} |")
    lines += [
        "",
        "| model (held-out toy test set) | exact match % | seeds |",
        "| --- | --- | --- |",
    ]
    for name, acc in rows.items():
        xs = list(acc.values())
        lines.append(f"| {name} | {mean(xs):.1f} ± {sd(xs):.1f} | {len(xs)} |")
    if seconds is not None:
        lines += ["", f"wall time {seconds // 60} min {seconds % 60} s"]
    text = "\n".join(lines)
    with open(out, "w") as f:
        f.write(text + "\n")
    return text


def setup(out, seed, quick):
    """toy.py setup: the toy written once; setup.json, last, says which (a rerun keeps it)."""
    marker = os.path.join(out, "setup.json")
    asked = dict(seed=seed, quick=quick)
    try:
        made = (
            checkpoints.read_marker(marker, ("seed", "quick")) if os.path.isfile(marker) else None
        )
    except errors.UserError as e:  # a stop while it was written
        raise SystemExit(f"error: {e}: delete {out} to set the toy up again") from None
    if made is None:
        make_toy(out, seed, workers=2, **(QUICK if quick else {}))
        with open(marker, "w") as f:
            json.dump(asked, f)
        print(f"toy setup in {out}: data/ tokenizer/ vision/ teacher_llm/ student_llm/")
    elif made != asked:
        raise SystemExit(f"error: {out} holds the toy setup {made}, not {asked}: delete it")
    else:
        print(f"toy setup in {out}: kept")


def evaluate_all(a):
    """toy.py eval: the prior, then each model; each appended to --results."""
    try:
        for model in a.model:
            flags.check_checkpoint("model", model, *flags.CHECKPOINT_FLAGS["init"])
    except errors.UserError as e:
        raise SystemExit(f"error: {e}") from None
    results = []
    if a.prior:
        acc = question_prior(a.prior, a.data)
        print(f"question-only prior {acc:.4f} on {a.data}")
        results.append({"row": "question-only prior (no image)", "seed": 0, "accuracy": acc})
    for model, name in zip(a.model, a.row or a.model):
        acc = mean(evaluate(model, a.data, a.images))
        print(f"exact match {acc:.4f} on {a.data} ({model})")
        results.append({"row": name, "seed": a.seed, "accuracy": acc})
    if a.results:
        with open(a.results, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in results))


def main(argv=None):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    formatter = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="write tiny checkpoints and a toy data set, offline")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few samples and steps (the tests)")
    p = sub.add_parser("eval", help="exact match of greedy answers on held-out questions")
    p.add_argument("--model", required=True, nargs="+", help="one or more checkpoint dirs")
    p.add_argument("--data", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--results", help="append {row, seed, accuracy} to this JSON-lines file")
    p.add_argument("--row", nargs="+", help="the table row name of each --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior", metavar="TRAIN_JSON", help="first, the question-only prior")
    p = sub.add_parser("table", help="the paired differences and every row, over seeds")
    p.add_argument("--results", required=True, nargs="+", help="one or more runs' results.jsonl")
    p.add_argument("--out", required=True, help="the table as Markdown")
    p.add_argument("--seconds", type=int, help="wall time of the run, printed under the table")
    a = ap.parse_args(argv)
    if a.cmd == "setup":
        setup(a.out, a.seed, a.quick)
    elif a.cmd == "eval":
        evaluate_all(a)
    else:
        print(table(a.results, a.out, a.seconds))


if __name__ == "__main__":
    main()

"""The toy: tiny real checkpoints and a synthetic image-QA set, written offline, so that every code
path of llava_kd.py runs on a laptop CPU; its eval and its table. Not part of the method.

    python toy.py setup --out runs/toy/setup           # tiny checkpoints + data
    python toy.py eval --model DIR [DIR ...] --data JSON --images DIR [--results F --row NAME ...]
                       [--prior TRAIN_JSON]  # and first, the question-only prior
    python toy.py table --results F --out table.md
    python toy.py probe --model DIR [DIR ...] --data JSON --images DIR  # what KD could pass on
    python toy.py draws --results RUN/results.jsonl [...]  # TOY_SEED draws side by side
"""

import argparse
import collections
import json
import os
import random

import torch
import transformers
from PIL import Image, ImageDraw

import checkpoints
import data
import errors
import flags
import models

# The toy data set: small images of two shapes, questions about colour, shape, size and position.
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
SHAPES, SIZES = ("circle", "square", "triangle"), ("small", "big")
PLACES = ("top left", "top right", "bottom left", "bottom right")


def _toy_scene(rng):
    shapes = rng.sample(SHAPES, 2)  # two different shapes
    places = rng.sample(PLACES, 2)  # in two different places
    return [
        dict(shape=s, place=p, colour=rng.choice(list(COLOURS)), size=rng.choice(SIZES))
        for s, p in zip(shapes, places)
    ]


def _toy_image(scene, px):
    img = Image.new("RGB", (px, px), (70, 70, 70))
    d, q = ImageDraw.Draw(img), px // 2
    for o in scene:
        x0, y0 = q * ("right" in o["place"]), q * ("bottom" in o["place"])
        m = q // 8 if o["size"] == "big" else q // 4
        box, c = (x0 + m, y0 + m, x0 + q - m - 1, y0 + q - m - 1), COLOURS[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse(box, fill=c)
        elif o["shape"] == "square":
            d.rectangle(box, fill=c)
        else:
            d.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=c)
    return img


def _toy_questions(scene):
    qa = []
    for o in scene:
        qa += [
            (f"What colour is the {o['shape']}?", o["colour"]),
            (f"What shape is in the {o['place']}?", o["shape"]),
            (f"Where is the {o['shape']}?", o["place"]),
            (f"Is the {o['shape']} small or big?", o["size"]),
        ]
    return qa


TEXT_ONLY = [
    ("What is the opposite of top?", "bottom"),
    ("What is the opposite of left?", "right"),
    ("How many sides does a square have?", "four"),
    ("How many sides does a triangle have?", "three"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What is the opposite of big?", "small"),
]


def _caption(scene):
    return (
        " and ".join(f"a {o['size']} {o['colour']} {o['shape']} in the {o['place']}" for o in scene)
        + "."
    )


def make_toy_data(
    out, seed=0, n_pretrain=1600, n_sft=1200, n_teacher_sft=4000, n_test=600, n_text=6000, px=32
):
    """Writes out/images/*.png and out/{pretrain,sft,teacher_sft,test}.json (LLaVA format), each
    split on images of its own, and out/text.json: text-only documents (captions; a scene described
    in words, then a question about it and its answer) that the toy LLMs are pretrained on, so that
    they know the toy language before the multimodal stages (its words; answering from a scene in
    context they barely learn: see the README). teacher_sft.json keeps a brief caption every 10th
    row. Returns the texts seen, for training a tokenizer."""
    rng, texts = random.Random(seed), []
    os.makedirs(os.path.join(out, "images"), exist_ok=True)

    def sample(split, i):
        scene, name = _toy_scene(rng), f"{split}_{i:05d}.png"
        _toy_image(scene, px).save(os.path.join(out, "images", name))
        return scene, name

    rows = {"pretrain": [], "sft": [], "teacher_sft": [], "test": []}
    for i in range(n_pretrain):
        scene, name = sample("pretrain", i)
        rows["pretrain"].append(
            {
                "id": f"pretrain_{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": _caption(scene)},
                ],
            }
        )
    for split, n in (("sft", n_sft), ("teacher_sft", n_teacher_sft), ("test", n_test)):
        for i in range(n):
            if split != "test" and i % 50 == 49:  # a few text-only rows, as in the LLaVA-1.5 mix
                q, a = rng.choice(TEXT_ONLY)
                rows[split].append(
                    {
                        "id": f"{split}_{i}",
                        "conversations": [
                            {"from": "human", "value": q},
                            {"from": "gpt", "value": a},
                        ],
                    }
                )
                continue
            scene, name = sample(split, i)
            if (
                split == "teacher_sft" and i % 10 == 4
            ):  # the teacher's mix keeps brief captions (as LLaVA-1.5's
                # has TextCaps): without them its SFT forgets the captions that DPT distils
                rows[split].append(
                    {
                        "id": f"{split}_{i}",
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": "<image>\nDescribe the image briefly."},
                            {"from": "gpt", "value": _caption(scene)},
                        ],
                    }
                )
                continue
            qa = rng.sample(_toy_questions(scene), rng.randint(1, 3) if split != "test" else 1)
            conv = []
            for j, (q, a) in enumerate(qa):
                conv += [
                    {"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                    {"from": "gpt", "value": a},
                ]
            rows[split].append({"id": f"{split}_{i}", "image": name, "conversations": conv})
    for split, r in rows.items():
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(r, f, indent=1)
        texts += [c["value"] for row in r for c in row["conversations"]]
    docs = []  # text only: no image is drawn for these scenes
    for _ in range(n_text):
        scene = _toy_scene(rng)
        q, a = rng.choice(_toy_questions(scene) + TEXT_ONLY[:1])
        docs.append({"caption": _caption(scene), "question": q, "answer": a})
    with open(os.path.join(out, "text.json"), "w") as f:
        json.dump(docs, f, indent=1)
    return texts + [d["caption"] for d in docs]


# Toy checkpoints: a SigLIP, a teacher and a student Qwen2 LLM, one trained byte-level BPE
# tokenizer.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' "
    "}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def toy_tokenizer(texts):
    """A byte-level BPE tokenizer trained on the toy texts, Qwen's special tokens and <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def real_ids_tokenizer(texts, n_regular, specials, added=(), first=(), **kw):
    """A byte-level BPE trained on texts, with the real checkpoints' special token ids: `first` at
    0, 1, ... (Llama's <unk> <s> </s>), its vocabulary filled up to n_regular entries, then
    `specials` and `added`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    spec = json.loads(tk.to_str())
    vocab = {t: i for i, t in enumerate(first)}
    vocab.update({t: i + len(first) for t, i in spec["model"]["vocab"].items()})
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), n_regular)})
    spec["model"]["vocab"] = vocab
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.add_special_tokens(list(first) + list(specials) + list(added))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


# teacher clearly larger than student; vocabulary sizes padded differently, as in real pairs
TOY_LLMS = {
    "teacher_llm": dict(
        hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, pad=64
    ),
    "student_llm": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, pad=16
    ),
}


def patch_quadrants(grid):
    """The quadrant (a PLACES entry) of each patch of a grid x grid image, in the tower's row-major
    order."""
    return [
        PLACES[2 * (r >= grid // 2) + (c >= grid // 2)] for r in range(grid) for c in range(grid)
    ]


def pixel_batch(scenes, processor, px):
    return torch.stack(
        [processor(_toy_image(s, px), return_tensors="pt")["pixel_values"][0] for s in scenes]
    )


def train_vision(tower, processor, px, steps, layer=-2, batch=64, seed=0):
    """Trains the toy SigLIP before it is frozen, as SigLIP is pretrained: every patch token of the
    layer LLaVA reads predicts what is in its quadrant (shape, colour, size, or nothing) and which
    quadrant it is in (real SigLIP features keep where a patch is: LLaVA answers "where" questions
    from them)."""
    rng, grid = random.Random(seed + 1), tower.config.image_size // tower.config.patch_size
    names = [("none",) + SHAPES, ("none",) + tuple(COLOURS), ("none",) + SIZES, PLACES]
    head = torch.nn.Linear(tower.config.hidden_size, sum(map(len, names)))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=2e-3)
    quadrant = patch_quadrants(grid)

    def patch_targets(
        scene,
    ):  # per patch: its quadrant's shape, colour and size (0: nothing there), the quadrant
        at = {o["place"]: o for o in scene}
        return [
            [
                n.index(at[q][k]) if q in at else 0
                for n, k in zip(names, ("shape", "colour", "size"))
            ]
            + [PLACES.index(q)]
            for q in quadrant
        ]

    for _ in range(steps):
        scenes = [_toy_scene(rng) for _ in range(batch)]
        target = torch.tensor([patch_targets(s) for s in scenes])
        h = tower(pixel_batch(scenes, processor, px), output_hidden_states=True).hidden_states[
            layer
        ]
        logits = head(h).split([len(n) for n in names], -1)
        loss = sum(
            torch.nn.functional.cross_entropy(part.flatten(0, 1), target[..., i].flatten())
            for i, part in enumerate(logits)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() if steps else None


def pretrain_llm(llm, tok, docs, steps, batch=32, lr=3e-3, seed=0):
    """Next-token training on text alone: captions (as pt/dpt print them, ending on eos) and chat
    turns in which a scene described in words is followed by a question and its answer."""
    rng = random.Random(seed + 2)
    texts = []
    for d in docs:
        texts.append(d["caption"] + tok.eos_token)
        texts.append(
            tok.apply_chat_template(
                [
                    {"role": "user", "content": d["caption"] + "\n" + d["question"]},
                    {"role": "assistant", "content": d["answer"]},
                ],
                tokenize=False,
            )
        )
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        enc = tok(
            rng.sample(texts, min(batch, len(texts))),
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = llm(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() if steps else None


QUICK = dict(
    n_pretrain=64,
    n_sft=100,
    n_teacher_sft=100,
    n_test=16,
    n_text=64,
    vision_steps=2,
    llm_steps=(2, 2),
)


def make_toy(out, seed=0, vision_steps=150, llm_steps=(600, 400), **data_sizes):
    """The toy setup, once for every seed: data, tokenizer, a trained then frozen vision tower, and
    a teacher and a student LLM pretrained on the toy texts (the teacher larger and longer)."""
    texts = make_toy_data(os.path.join(out, "data"), seed, **data_sizes)
    tok = toy_tokenizer(texts)
    torch.manual_seed(seed)
    vcfg = transformers.SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    tower, processor = (
        transformers.SiglipVisionModel(vcfg),
        transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}),
    )
    loss = train_vision(tower, processor, 32, vision_steps, seed=seed)
    tower.save_pretrained(os.path.join(out, "vision"))
    processor.save_pretrained(os.path.join(out, "vision"))
    docs = json.load(open(os.path.join(out, "data", "text.json")))
    report = [f"vision tower loss {loss}"]
    for (name, c), steps in zip(TOY_LLMS.items(), llm_steps):
        c = dict(c)
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
        report.append(f"{name} text loss {pretrain_llm(llm, tok, docs, steps, seed=seed)}")
        llm.generation_config = transformers.GenerationConfig(
            eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
            pad_token_id=tok.eos_token_id,
        )
        llm.save_pretrained(os.path.join(out, name))
        tok.save_pretrained(os.path.join(out, name))
    print(
        f"toy setup in {out} ({', '.join(report)}): vision/ teacher_llm/ student_llm/ "
        f"data/{{pretrain,sft,teacher_sft,test,text}}.json data/images/"
    )


@torch.no_grad()
def evaluate(model_dir, data_json, images, batch_size=32, max_new_tokens=10):
    """Exact-match accuracy of greedy answers to the first question of each sample (the toy test
    set)."""
    model, processor = models.load_llava(model_dir)
    model.eval()
    ds = data.LlavaDataset(data_json, images, processor, chat=True, max_length=4096)
    tok, correct = processor.tokenizer, 0
    for i in range(0, len(ds), batch_size):
        rows = [ds.rows[j] for j in range(i, min(i + batch_size, len(ds)))]
        prompts = [[{"role": "user", "content": conv[0]["value"]}] for _, _, conv in rows]
        texts = [
            tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
        ]
        images_ = [Image.open(path).convert("RGB") for _, path, _ in rows if path]
        tok.padding_side = "left"  # generation continues every row from its last token
        inputs = processor(text=texts, images=images_ or None, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(
            ans.strip().lower() == conv[1]["value"].strip().lower()
            for ans, (_, _, conv) in zip(answers, rows)
        )
    return correct / len(ds)


@torch.no_grad()
def _answer_and_visual_outputs(model, processor, data_json, images, scenes, batch_size=50):
    """log-probs at the answer tokens of data_json (with their labels), and at the visual positions
    of the images of `scenes` (causal: they depend on the image and the prompt before it, not on the
    question)."""
    ds = data.LlavaDataset(data_json, images, processor, chat=True, max_length=4096)
    answers, labels, visual = [], [], []
    for i in range(0, len(ds), batch_size):
        b = data.collate(
            [ds[j] for j in range(i, min(i + batch_size, len(ds)))],
            processor.tokenizer.pad_token_id,
        )
        y = b.pop("labels")[:, 1:]
        if b["pixel_values"] is None:
            b.pop("pixel_values")
        answers.append(model(**b).logits[:, :-1][y != data.IGNORE].float().log_softmax(-1))
        labels.append(y[y != data.IGNORE])
    tok = processor.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe the image briefly."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    for i in range(0, len(scenes), batch_size):
        ims = [_toy_image(s, 32) for s in scenes[i : i + batch_size]]
        inp = processor(text=[prompt] * len(ims), images=ims, return_tensors="pt")
        logits = model(**inp).logits[inp["input_ids"] == model.config.image_token_id]
        visual.append(logits.float().log_softmax(-1).view(len(ims), -1, logits.shape[-1]))
    return torch.cat(answers), torch.cat(labels), torch.cat(visual)


def _linear_probe(x, y, n_train, steps=300):
    """Held-out accuracy of a linear classifier (softmax regression, Adam) trained on the first
    n_train rows."""
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(x[:n_train]), y[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (lin(x[n_train:]).argmax(-1) == y[n_train:]).float().mean().item()


def probe(model_dir, data_json, images, n_scenes=600, seed=0):
    """What a model's outputs hold that distillation could pass on (the README's account of DFT on
    the toy). Answer tokens of data_json (L_res's positions): the probability given to the label,
    how often the top-1 is the label, the entropy. Visual positions (L_vis's and L_rel's): how well
    a linear probe on the next-token log-probs tells the colour and the shape of the object in each
    patch's quadrant (or none), trained on the patches of 2/3 of n_scenes new scenes, tested on the
    rest."""
    model, processor = models.load_llava(model_dir)
    model.eval()
    rng = random.Random(seed + 3)
    scenes = [_toy_scene(rng) for _ in range(n_scenes)]
    lp, y, vis = _answer_and_visual_outputs(model, processor, data_json, images, scenes)
    # the end-of-turn token: always certain
    end = y == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    p_label, top1, entropy = (
        lp.gather(1, y[:, None])[:, 0].exp(),
        lp.argmax(-1) == y,
        -(lp.exp() * lp).sum(-1),
    )
    quadrant = patch_quadrants(int(vis.shape[1] ** 0.5))
    n_train, probes = (2 * n_scenes // 3) * vis.shape[1], {}
    for key, names in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        target = torch.tensor(
            [
                [names.index(at[q][key]) + 1 if q in at else 0 for q in quadrant]
                for at in ({o["place"]: o for o in s} for s in scenes)
            ]
        )
        probes[key] = _linear_probe(vis.flatten(0, 1), target.flatten(), n_train)
    a = ~end
    return (
        f"{model_dir}: answer tokens ({int(a.sum())}): p(label) {p_label[a].mean():.3f}, top-1 = "
        f"label "
        f"{top1[a].float().mean():.3f}, entropy {entropy[a].mean():.2f} nats; visual positions: "
        f"entropy "
        f"{-(vis.exp() * vis).sum(-1).mean():.2f} nats, linear probe (held out) "
        f"colour {probes['colour']:.2f}, "
        f"shape {probes['shape']:.2f} (none: {(target == 0).float().mean():.2f} of the patches)"
    )


def question_prior(train_json, test_json):
    """Exact match of the best answer from the question alone: the most frequent answer to the same
    question in the training rows (what a model that ignores the image can reach)."""
    answers = {}
    for row in json.load(open(train_json)):
        conv = row["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            question = q["value"].replace("<image>\n", "")
            answers.setdefault(question, collections.Counter())[a["value"]] += 1
    test = [row["conversations"][:2] for row in json.load(open(test_json))]

    def best(q):
        return answers[q].most_common(1)[0][0] if q in answers else None

    return sum(best(q["value"].replace("<image>\n", "")) == a["value"] for q, a in test) / len(test)


def _mean(xs):
    return sum(xs) / len(xs)


def _sd(xs):  # the sample standard deviation (0 for a single value)
    return (sum((x - _mean(xs)) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def table(results, out, seconds=None):
    """One row per training scheme: mean and standard deviation of the accuracy over seeds."""
    rows = {}
    for line in open(results):
        r = json.loads(line)
        rows.setdefault(r["row"], []).append(100 * r["accuracy"])
    lines = ["| model (held-out toy test set) | exact match % | seeds |", "| --- | --- | --- |"]
    for name, xs in rows.items():
        lines.append(f"| {name} | {_mean(xs):.1f} ± {_sd(xs):.1f} | {len(xs)} |")
    text = "\n".join(lines) + (
        f"\n\nwall time {seconds // 60} min {seconds % 60} s" if seconds is not None else ""
    )
    with open(out, "w") as f:
        f.write(text + "\n")
    return text


KD, CONTROL = "student DPT-SFT-DFT (LLaVA-KD)", "student PT-SFT-SFT (no teacher)"
DIFFERENCES = (
    (KD, CONTROL),
    ("student PT-SFT-DFT", CONTROL),
    ("student DPT-SFT", "student PT-SFT"),
)


def draws(results, out=None):
    """Several recipe runs side by side (e.g. one per TOY_SEED, each its results.jsonl): each run's
    mean per row, then the paired differences the issue's bars are about, seed by seed (both models
    of a difference come from the same student seed), their mean per run, and over all runs: the
    mean and standard deviation of all seeds, in how many the difference is above 0, and the spread
    of the runs' means (seeds of one run share its data and teacher, so the runs, not the seeds, are
    the independent repeats)."""
    runs = []
    for path in results:
        if not os.path.isfile(path):
            raise SystemExit(
                f"error: no results file {path}: give each run's results.jsonl (train.sh writes it "
                f"in OUT)"
            )
        acc = {}
        for line in open(path):
            r = json.loads(line)
            acc.setdefault(r["row"], {})[r["seed"]] = 100 * r["accuracy"]
        missing = sorted({n for pair in DIFFERENCES for n in pair} - set(acc))
        if missing:
            raise SystemExit(
                f"error: {path} has no rows {missing}: give the results.jsonl of a whole toy "
                f"recipe run"
            )
        runs.append((os.path.dirname(path) or path, acc))
    names = list(runs[0][1])
    lines = ["| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [
        f"| {run} | "
        + " | ".join(f"{_mean(list(acc[n].values())):.1f}" if n in acc else "-" for n in names)
        + " |"
        for run, acc in runs
    ]
    for a, b in DIFFERENCES:
        lines += ["", f"{a.replace('student ', '')} minus {b.replace('student ', '')}, per seed:"]
        pooled, per_run = [], []
        for run, acc in runs:
            d = [acc[a][s] - acc[b][s] for s in sorted(acc[a]) if s in acc[b]]
            pooled, per_run = pooled + d, per_run + [_mean(d)]
            lines.append(
                f"  {run}: " + ", ".join(f"{x:+.1f}" for x in d) + f" (mean {_mean(d):+.1f})"
            )
        lines.append(
            f"  all {len(pooled)} seeds: mean {_mean(pooled):+.1f}, sd {_sd(pooled):.1f}, above 0 "
            f"in "
            f"{sum(x > 0 for x in pooled)} of {len(pooled)}; the {len(runs)} runs' means: sd "
            f"{_sd(per_run):.1f}, standard error of their "
            f"mean {_sd(per_run) / len(runs) ** 0.5:.1f}"
        )
    text = "\n".join(lines)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


def main(argv=None):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="write tiny checkpoints and a toy data set, offline")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="a few samples and training steps (the tests)"
    )
    p = sub.add_parser("eval", help="exact-match accuracy on held-out questions")
    p.add_argument("--model", required=True, nargs="+", help="one or more checkpoint dirs")
    p.add_argument("--data", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--results", help="append {row, seed, accuracy} to this JSON-lines file")
    p.add_argument("--row", nargs="+", help="the table row name of each --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prior",
        metavar="TRAIN_JSON",
        help="first, the exact match from the question alone (its majority answer in these rows)",
    )
    p = sub.add_parser(
        "probe", help="what a model's outputs hold at the answer tokens and at the visual positions"
    )
    p.add_argument("--model", required=True, nargs="+")
    p.add_argument(
        "--data",
        required=True,
        help="the rows whose answer tokens are scored (e.g. the students' sft.json)",
    )
    p.add_argument("--images", required=True)
    p = sub.add_parser("table", help="mean and spread over seeds of the eval results")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True, help="the table as Markdown")
    p.add_argument("--seconds", type=int, help="wall time of the run, printed under the table")
    p = sub.add_parser(
        "draws", help="several runs' results side by side, with the paired differences per seed"
    )
    p.add_argument(
        "--results",
        required=True,
        nargs="+",
        help="each run's results.jsonl (e.g. one per TOY_SEED)",
    )
    p.add_argument("--out", help="also write the report here")
    a = ap.parse_args(argv)
    if a.cmd == "setup":  # setup.json last: a rerun of the recipe keeps the setup it trained on
        marker, asked = os.path.join(a.out, "setup.json"), dict(seed=a.seed, quick=a.quick)
        try:
            found = os.path.isfile(marker)
            made = checkpoints.read_marker(marker, ("seed", "quick")) if found else None
        except errors.UserError as e:  # a stop while it was written
            raise SystemExit(f"error: {e}: delete {a.out} to set the toy up again") from None
        if made is None:
            make_toy(a.out, a.seed, **(QUICK if a.quick else {}))
            with open(marker, "w") as f:
                json.dump(asked, f)
        elif made != asked:
            raise SystemExit(f"error: {a.out} holds the toy setup {made}, not {asked}: delete it")
        else:
            print(f"toy setup in {a.out}: kept")
    elif a.cmd == "eval":
        try:
            for model in a.model:
                flags.check_checkpoint("model", model, *flags.CHECKPOINT_FLAGS["init"])
        except errors.UserError as e:
            raise SystemExit(f"error: {e}") from None
        if a.prior:
            acc = question_prior(a.prior, a.data)
            print(f"question-only prior {acc:.4f} on {a.data}")
            if a.results:
                with open(a.results, "a") as f:
                    row = {"row": "question-only prior (no image)", "seed": 0, "accuracy": acc}
                    f.write(json.dumps(row) + "\n")
        for model, row in zip(a.model, a.row or a.model):
            acc = evaluate(model, a.data, a.images)
            print(f"exact match {acc:.4f} on {a.data} ({model})")
            if a.results:
                with open(a.results, "a") as f:
                    f.write(json.dumps({"row": row, "seed": a.seed, "accuracy": acc}) + "\n")
    elif a.cmd == "probe":
        for model in a.model:
            print(probe(model, a.data, a.images))
    elif a.cmd == "draws":
        print(draws(a.results, a.out))
    else:
        print(table(a.results, a.out, a.seconds))


if __name__ == "__main__":
    main()

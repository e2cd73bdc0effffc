"""The toy's world and its data set, written offline by `toy.py setup`: images of one object;
questions whose answers are facts about the object's kind (its name, food and home: none of them
visible), each training answer one annotator's, who misjudges the size NOISE of the time; a test
that asks every question of its images, scored against the true facts (the consensus, as VQAv2
scores against ten annotators); the text the toy LLMs are pretrained on."""

import json
import os
import random

from PIL import Image, ImageDraw

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
NOISE = 0.3  # how often an annotator misjudges the size: another kind, other facts
TEXT_ONLY = [("What is the opposite of top?", "bottom"), ("What is the opposite of big?", "small")]
SPLITS = ("pretrain", "sft", "teacher_sft")  # the training splits, each on images of its own
COUNTS = dict(n_pretrain=1600, n_sft=400, n_teacher_sft=5000, n_test=600, n_text=6000)
COUNTS["n_heldout"] = 96  # the held-out images that training reports on (--eval_data)
FOODS = ("seeds", "fish", "leaves", "honey", "grass", "berries")
HOMES = ("caves", "trees", "rivers", "hills", "sand", "snow")
SYLLABLES = ("da", "ki", "lo", "mu", "pe", "ra", "su", "to", "wu", "zi", "bo", "ne")
QUESTIONS = (
    ("What is it called?", "name"),
    ("What does it eat?", "food"),
    ("Where does it live?", "home"),
)


def make_world(rng):
    """The toy world's facts: each kind of object (colour, shape, size) has a name, a food and a
    home, none of which the image shows."""
    kinds = [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]
    names = rng.sample([a + b for a in SYLLABLES for b in SYLLABLES], len(kinds))
    facts = [dict(name=n, food=rng.choice(FOODS), home=rng.choice(HOMES)) for n in names]
    return dict(zip(kinds, facts))


def scene(rng):
    """One object: a colour, a shape, a size, and the quadrant it is in."""
    return dict(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(SIZES),
        place=rng.choice(PLACES),
    )


def kind(o):
    return o["colour"], o["shape"], o["size"]


def draw(o, px=32):
    img = Image.new("RGB", (px, px), (70, 70, 70))
    d = ImageDraw.Draw(img)
    q = px // 2
    x0 = q * ("right" in o["place"])
    y0 = q * ("bottom" in o["place"])
    m = q // 8 if o["size"] == "big" else q // 4
    box = (x0 + m, y0 + m, x0 + q - m - 1, y0 + q - m - 1)
    colour = COLOURS[o["colour"]]
    if o["shape"] == "circle":
        d.ellipse(box, fill=colour)
    elif o["shape"] == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], colour)
    return img


def seen(rng, o):
    """The object as one annotator saw it: its size misjudged NOISE of the time."""
    misjudged = rng.random() < NOISE
    return o | {"size": SIZES[1 - SIZES.index(o["size"])]} if misjudged else o


CAPTION = "Describe the image briefly."


def caption(o):
    return f"a {o['size']} {o['colour']} {o['shape']} in the {o['place']}."


def row(split, i, image, turns):
    conv = []
    for j, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" if j == 0 and image else "") + q})
        conv.append({"from": "gpt", "value": a})
    return dict(id=f"{split}_{i}", conversations=conv, **({"image": image} if image else {}))


def split_rows(rng, world, split, n, images):
    """n rows of a training split, each on an image of its own, each answered by one annotator:
    1-3 questions about the object's kind (a few text-only rows, as in the LLaVA-1.5 mix);
    pretrain: captions; teacher_sft keeps a caption every 10th row (LLaVA-1.5's mix has TextCaps:
    without them its SFT forgets what DPT distils)."""
    rows = []
    for i in range(n):
        if split != "pretrain" and i % 50 == 49:
            rows.append(row(split, i, None, [rng.choice(TEXT_ONLY)]))
            continue
        o = scene(rng)
        name = f"{split}_{i:05d}.png"
        draw(o).save(os.path.join(images, name))
        if split == "pretrain" or (split == "teacher_sft" and i % 10 == 4):
            turns = [(CAPTION, caption(seen(rng, o)))]
        else:
            facts = world[kind(seen(rng, o))]
            turns = [(q, facts[k]) for q, k in rng.sample(QUESTIONS, rng.randint(1, 3))]
        rows.append(row(split, i, name, turns))
    return rows


def held_out_rows(world, seed, n, images):
    """--eval_data's rows: n images of their own, each with its true caption (heldout_pretrain, for
    pt and dpt) and one question with its true answer (heldout_sft). Drawn from a generator of their
    own: every other split is what it is without them."""
    rng = random.Random(f"held-out {seed}")
    rows = dict(heldout_pretrain=[], heldout_sft=[])
    for i in range(n):
        o = scene(rng)
        name = f"heldout_{i:05d}.png"
        draw(o).save(os.path.join(images, name))
        q, k = QUESTIONS[i % len(QUESTIONS)]
        rows["heldout_pretrain"].append(row("heldout", i, name, [(CAPTION, caption(o))]))
        rows["heldout_sft"].append(row("heldout", i, name, [(q, world[kind(o)][k])]))
    return rows


def corpus(rng, world, kinds, n):
    """n text-only documents about `kinds`: a fact sentence, and a kind in words followed by a
    question about it and its answer."""
    docs = []
    for _ in range(n):
        k = rng.choice(kinds)
        f = world[k]
        o = dict(zip(("colour", "shape", "size"), k), place=rng.choice(PLACES))
        named = f"The {k[2]} {k[0]} {k[1]} is called a {f['name']}"
        fact = f"{named}; it eats {f['food']} and lives in {f['home']}."
        q, key = rng.choice(QUESTIONS)
        docs.append(dict(text=fact, prompt=caption(o) + "\n" + q, answer=f[key]))
    return docs


def make_toy_data(out, seed=0, **sizes):
    """out/images/*.png and out/{pretrain,sft,teacher_sft,test,heldout_*}.json (LLaVA format), each
    split on images of its own; test.json asks every question of each image once, with the true
    answer.
    out/text.json: the text-only documents each toy LLM is pretrained on: the teacher's about every
    kind, the student's (a third as many) about a third of the kinds. Returns every text written,
    for training a tokenizer."""
    n = COUNTS | sizes
    rng = random.Random(seed)
    world = make_world(rng)
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rows = {split: split_rows(rng, world, split, n[f"n_{split}"], images) for split in SPLITS}
    rows["test"] = []
    for i in range(n["n_test"]):
        o = scene(rng)
        name = f"test_{i:05d}.png"
        draw(o).save(os.path.join(images, name))
        for j, (q, k) in enumerate(QUESTIONS):
            rows["test"].append(row("test", f"{i}_{j}", name, [(q, world[kind(o)][k])]))
    kinds = list(world)
    rng.shuffle(kinds)
    text = dict(
        teacher_llm=corpus(rng, world, kinds, n["n_text"]),
        student_llm=corpus(rng, world, kinds[: len(kinds) // 3], n["n_text"] // 3),
    )
    held_out = held_out_rows(world, seed, n["n_heldout"], images)
    for split, r in (rows | held_out).items():
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(r, f, indent=1)
    with open(os.path.join(out, "text.json"), "w") as f:
        json.dump(text, f, indent=1)
    texts = [c["value"] for r in rows.values() for x in r for c in x["conversations"]]
    return texts + [d[k] for d in text["teacher_llm"] for k in ("text", "prompt")]

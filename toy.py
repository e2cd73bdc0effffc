"""The toy: tiny real checkpoints and a synthetic image-QA set, written offline, so that every code path of
llava_kd.py runs on a laptop CPU; its eval and its table. Not part of the method.

    python toy.py setup --out runs/toy/setup           # tiny checkpoints + data
    python toy.py eval --model DIR [DIR ...] --data JSON --images DIR [--results F --row NAME ...]
    python toy.py table --results F --out table.md
"""
import argparse
import json
import os
import random

import torch
import transformers
from PIL import Image, ImageDraw

import data
import llava_kd

# The toy data set: small images of two shapes, questions about colour, shape, size and position.
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40),
           "purple": (160, 60, 200), "white": (245, 245, 245)}
SHAPES, SIZES = ("circle", "square", "triangle"), ("small", "big")
PLACES = ("top left", "top right", "bottom left", "bottom right")


def _toy_scene(rng):
    a, b = rng.sample(SHAPES, 2), rng.sample(PLACES, 2)  # two different shapes in two different places
    return [dict(shape=a[i], place=b[i], colour=rng.choice(list(COLOURS)), size=rng.choice(SIZES)) for i in (0, 1)]


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
        qa += [(f"What colour is the {o['shape']}?", o["colour"]), (f"What shape is in the {o['place']}?", o["shape"]),
               (f"Where is the {o['shape']}?", o["place"]), (f"Is the {o['shape']} small or big?", o["size"])]
    return qa


TEXT_ONLY = [("What is the opposite of top?", "bottom"), ("What is the opposite of left?", "right"),
             ("How many sides does a square have?", "four"), ("How many sides does a triangle have?", "three"),
             ("What colour is the sky on a clear day?", "blue"), ("What is the opposite of big?", "small")]


def make_toy_data(out, seed=0, n_pretrain=1600, n_sft=2500, n_test=300, px=32):
    """Writes out/images/*.png and out/{pretrain,sft,test}.json (LLaVA format); returns the texts seen,
    for training a tokenizer."""
    rng, texts = random.Random(seed), []
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    def sample(split, i):
        scene, name = _toy_scene(rng), f"{split}_{i:05d}.png"
        _toy_image(scene, px).save(os.path.join(out, "images", name))
        return scene, name
    rows = {"pretrain": [], "sft": [], "test": []}
    for i in range(n_pretrain):
        scene, name = sample("pretrain", i)
        cap = " and ".join(f"a {o['size']} {o['colour']} {o['shape']} in the {o['place']}" for o in scene) + "."
        rows["pretrain"].append({"id": f"pretrain_{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": cap}]})
    for split, n in (("sft", n_sft), ("test", n_test)):
        for i in range(n):
            if split == "sft" and i % 50 == 49:  # a few text-only rows, as in the LLaVA-1.5 mix
                q, a = rng.choice(TEXT_ONLY)
                rows[split].append({"id": f"{split}_{i}", "conversations": [
                    {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
                continue
            scene, name = sample(split, i)
            qa = rng.sample(_toy_questions(scene), rng.randint(1, 3) if split == "sft" else 1)
            conv = []
            for j, (q, a) in enumerate(qa):
                conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
            rows[split].append({"id": f"{split}_{i}", "image": name, "conversations": conv})
    for split, r in rows.items():
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(r, f, indent=1)
        texts += [c["value"] for row in r for c in row["conversations"]]
    return texts


# Toy checkpoints: a SigLIP, a teacher and a student Qwen2 LLM, one trained byte-level BPE tokenizer.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def toy_tokenizer(texts):
    """A byte-level BPE tokenizer trained on the toy texts, with Qwen's special tokens and <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", chat_template=CHATML)


TOY_LLMS = {  # teacher clearly larger than student; vocabulary sizes padded differently, as in real pairs
    "teacher_llm": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, pad=64),
    "student_llm": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, pad=16),
}


def make_toy(out, seed=0, **data_sizes):
    texts = make_toy_data(os.path.join(out, "data"), seed, **data_sizes)
    tok = toy_tokenizer(texts)
    torch.manual_seed(seed)
    vcfg = transformers.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4)
    transformers.SiglipVisionModel(vcfg).save_pretrained(os.path.join(out, "vision"))
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(os.path.join(out, "vision"))
    for name, c in TOY_LLMS.items():
        c = dict(c)
        pad = c.pop("pad")
        cfg = transformers.Qwen2Config(vocab_size=-(-len(tok) // pad) * pad, num_key_value_heads=c["num_attention_heads"],
                                       max_position_embeddings=512, tie_word_embeddings=name == "student_llm",
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **c)
        llm = transformers.Qwen2ForCausalLM(cfg)
        llm.generation_config = transformers.GenerationConfig(
            eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")], pad_token_id=tok.eos_token_id)
        llm.save_pretrained(os.path.join(out, name))
        tok.save_pretrained(os.path.join(out, name))
    print(f"toy setup in {out}: vision/ teacher_llm/ student_llm/ data/{{pretrain,sft,test}}.json data/images/")


@torch.no_grad()
def evaluate(model_dir, data_json, images, batch_size=32, max_new_tokens=10):
    """Exact-match accuracy of greedy answers to the first question of each sample (the toy test set)."""
    model, processor = llava_kd.load_llava(model_dir)
    model.eval()
    ds = data.LlavaDataset(data_json, images, processor, chat=True, max_length=4096)
    tok, correct = processor.tokenizer, 0
    for i in range(0, len(ds), batch_size):
        rows = [ds.rows[j] for j in range(i, min(i + batch_size, len(ds)))]
        prompts = [[{"role": "user", "content": conv[0]["value"]}] for _, _, conv in rows]
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        images_ = [Image.open(path).convert("RGB") for _, path, _ in rows if path]
        tok.padding_side = "left"  # generation continues every row from its last token
        inputs = processor(text=texts, images=images_ or None, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(ans.strip().lower() == conv[1]["value"].strip().lower() for ans, (_, _, conv) in zip(answers, rows))
    return correct / len(ds)


def table(results, out, seconds=None):
    """One row per training scheme: mean and standard deviation of the accuracy over seeds."""
    rows = {}
    for line in open(results):
        r = json.loads(line)
        rows.setdefault(r["row"], []).append(100 * r["accuracy"])
    lines = ["| model (held-out toy test set) | exact match % | seeds |", "| --- | --- | --- |"]
    for name, xs in rows.items():
        sd = (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5
        lines.append(f"| {name} | {sum(xs) / len(xs):.1f} ± {sd:.1f} | {len(xs)} |")
    text = "\n".join(lines) + (f"\n\nwall time {seconds // 60} min {seconds % 60} s" if seconds is not None else "")
    with open(out, "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="write tiny checkpoints and a toy data set, offline")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("eval", help="exact-match accuracy on held-out questions")
    p.add_argument("--model", required=True, nargs="+", help="one or more checkpoint dirs")
    p.add_argument("--data", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--results", help="append {row, seed, accuracy} to this JSON-lines file")
    p.add_argument("--row", nargs="+", help="the table row name of each --model")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("table", help="mean and spread over seeds of the eval results")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True, help="the table as Markdown")
    p.add_argument("--seconds", type=int, help="wall time of the run, printed under the table")
    a = ap.parse_args(argv)
    if a.cmd == "setup":
        make_toy(a.out, a.seed)
    elif a.cmd == "eval":
        for model, row in zip(a.model, a.row or a.model):
            acc = evaluate(model, a.data, a.images)
            print(f"exact match {acc:.4f} on {a.data} ({model})")
            if a.results:
                with open(a.results, "a") as f:
                    f.write(json.dumps({"row": row, "seed": a.seed, "accuracy": acc}) + "\n")
    else:
        print(table(a.results, a.out, a.seconds))


if __name__ == "__main__":
    main()

"""Chat and generation, by differences that must not matter: where <image> stands in a sample, how
many questions are generated at once, which eos ids a model's own generation config had."""

import json

import pytest
import torch
import transformers
from PIL import Image

import chat
import checkpoints
import data
import models
import toy as toy_module


@pytest.mark.parametrize("old", [None, 7, [7], [7, 9], [9, 7, 9]])
def test_the_turn_end_leads_the_eos_ids_and_every_one_the_config_had_stays(ckpts, old):
    _, proc = models.load_llava(ckpts / "student")
    config = transformers.GenerationConfig(eos_token_id=old)
    chat.prepare_chat(proc, config, "student", end_is_eos=True)
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    had = [] if old is None else [old] if isinstance(old, int) else old
    assert config.eos_token_id[0] == end == proc.tokenizer.eos_token_id
    assert set(config.eos_token_id) == {end, *had}
    assert len(config.eos_token_id) == len(set(config.eos_token_id))


def test_image_in_a_later_turn_is_the_sample_with_it_in_the_first(toy, tmp_path):
    """LLaVA puts the image at the start of the first human turn; a sample that names it in a later
    turn (or not at all) trains on the same tokens."""
    rows = json.load(open(f"{toy}/data/sft.json"))
    row = next(r for r in rows if r.get("image") and len(r["conversations"]) >= 4)
    first = [dict(t) for t in row["conversations"]]
    first[0]["value"] = "<image>\n" + first[0]["value"].replace("<image>", "").strip()
    for t in first[1:]:
        t["value"] = t["value"].replace("<image>", "").strip()
    later = [dict(t) for t in first]
    later[0]["value"] = later[0]["value"].removeprefix("<image>\n")
    later[2]["value"] = "<image>\n" + later[2]["value"]
    nowhere = [dict(t) for t in later]
    nowhere[2]["value"] = nowhere[2]["value"].removeprefix("<image>\n")
    samples = [
        dict(row, id=f"s{i}", conversations=c) for i, c in enumerate([first, later, nowhere])
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(samples))
    model, proc = models.build_student(f"{toy}/vision", f"{toy}/student_llm")
    ds = data.LlavaDataset(str(path), f"{toy}/data/images", proc, chat=True, max_length=512)
    items = [ds[i] for i in range(3)]
    image = items[0]["input_ids"] == model.config.image_token_id
    assert int(image.sum()) == ds.n_image_tokens
    for item in items[1:]:
        assert torch.equal(item["input_ids"], items[0]["input_ids"])
        assert torch.equal(item["labels"], items[0]["labels"])


def test_toy_eval_is_right_exactly_where_greedy_generation_writes_the_answer(toy, ckpts, tmp_path):
    """toy.py eval scores a batch in one forward; a row is right where generate(), greedy, one
    question at a time, writes the answer's tokens and ends the turn. Perturbed weights answer each
    question its own way; each row asked with the model's own answer, and again with another."""
    model, proc = models.load_llava(ckpts / "student")
    g = torch.Generator().manual_seed(0)
    tok = proc.tokenizer
    ends = model.generation_config.eos_token_id
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p += 0.3 * torch.randn(p.shape, generator=g)
        model.lm_head.weight[ends] *= 1.75  # turns that end, after a few tokens or at once
        for i in range(len(tok)):  # answers in words, as the chat template writes them
            if i not in ends and not tok.decode([i]).strip().isalpha():
                model.lm_head.weight[i] = 0
    checkpoints.save_checkpoint_files(model, proc, tmp_path / "model")
    model, proc = models.load_llava(tmp_path / "model")
    model.eval()
    rows, expected = [], []
    for row in json.load(open(f"{toy}/data/sft.json")):
        if "image" not in row:
            continue
        prompt = [{"role": "user", "content": row["conversations"][0]["value"]}]
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        image = Image.open(f"{toy}/data/images/{row['image']}").convert("RGB")
        inputs = proc(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=ends)
        written = out[0, inputs["input_ids"].shape[1] :].tolist()
        first = [t in ends for t in written] + [True]
        own = tok.decode(written[: min(first.index(True), 6)])
        for answer in (own, row["conversations"][1]["value"], own + "x"):
            if not answer.strip() or answer != answer.strip() or not answer.isprintable():
                continue  # empty: refused by the data checks; else as the chat template writes it
            tokens = tok(answer, add_special_tokens=False)["input_ids"]
            n = len(tokens)  # right: the answer's tokens, then a token that ends the turn
            right = written[:n] == tokens and len(written) > n and written[n] in ends
            asked = row["conversations"][:1] + [{"from": "gpt", "value": answer}]
            rows.append(dict(row, id=f"{row['id']}_{len(rows)}", conversations=asked))
            expected.append(right)
    assert 3 <= sum(expected) < len(expected)  # some right, some not
    path = tmp_path / "asked.json"
    path.write_text(json.dumps(rows))
    for batch in (5, 64):
        assert (
            toy_module.evaluate(tmp_path / "model", path, f"{toy}/data/images", batch) == expected
        )

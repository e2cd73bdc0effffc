"""The checkpoints in clients no one here wrote: transformers' pipeline and typed chat content
(VLMEvalKit's form), and lmms-eval's llava_hf way of prompting (string content through the
tokenizer's template) and of stopping (generate(..., eos_token_id=tokenizer.eos_token_id))."""

import json

import pytest
import transformers
from conftest import args
from PIL import Image

import llava_kd
from data import IGNORE, LlavaDataset


def typed(conv):
    """LLaVA JSON turns -> typed chat messages, as the pipeline and VLMEvalKit send them."""
    msgs = []
    for j, c in enumerate(conv):
        text = {"type": "text", "text": c["value"].replace("<image>\n", "")}
        msgs.append(
            {
                "role": ("user", "assistant")[j % 2],
                "content": ([{"type": "image"}] if "<image>" in c["value"] else []) + [text],
            }
        )
    return msgs


def stock(out):
    return transformers.LlavaForConditionalGeneration.from_pretrained(
        out
    ), transformers.AutoProcessor.from_pretrained(out)


def train(toy, stage, out, *extra):
    llava_kd.main(args(toy, stage, out, *map(str, extra)))


@pytest.fixture(scope="module")
def student_dir(ckpts):  # conftest.py's untrained student
    return ckpts / "student"


@pytest.fixture(scope="module")
def sft_dir(toy, student_dir, tmp_path_factory):
    """A short toy SFT: long enough to learn where an answer ends (24 epochs; after 12, one of the
    first 8 test questions was answered with its end at once)."""
    out = tmp_path_factory.mktemp("sft")
    train(
        toy,
        "sft",
        out,
        "--init",
        student_dir,
        "--lr",
        "3e-3",
        "--epochs",
        "24",
        "--global_batch_size",
        "20",
        "--batch_size",
        "20",
        "--max_length",
        "192",
    )
    return out


def test_saved_processor_and_tokenizer_render_string_and_typed_content_alike(student_dir):
    _, proc = stock(student_dir)
    tok = transformers.AutoTokenizer.from_pretrained(student_dir)
    conv = [
        {"value": "<image>\nWhat colour is the circle?"},
        {"value": "red"},
        {"value": "Where is it?"},
    ]
    string = [{"role": m["role"], "content": c["value"]} for m, c in zip(typed(conv), conv)]
    for gen in (False, True):
        t = proc.apply_chat_template(typed(conv), add_generation_prompt=gen, tokenize=False)
        assert t == proc.apply_chat_template(string, add_generation_prompt=gen, tokenize=False)
        # lmms-eval's call
        assert t == tok.apply_chat_template(string, add_generation_prompt=gen, tokenize=False)
    assert t.endswith("<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n")


def test_training_prompt_is_what_the_saved_processor_renders_for_generation(toy, sft_dir):
    """The tokens before each labelled answer are the saved processor's typed-content generation
    prompt."""
    _, proc = stock(sft_dir)
    ds = LlavaDataset(f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=400)
    checked = 0
    for i in range(12):
        sid, path, conv = ds.rows[i]
        item = ds[i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        starts = [
            k
            for k in range(len(ids))
            if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE)
        ]
        assert len(starts) == len(conv) // 2
        for turn, k in enumerate(starts):
            prompt = proc.apply_chat_template(
                typed(conv[: 2 * turn + 1]), add_generation_prompt=True, tokenize=False
            )
            images = Image.open(path).convert("RGB") if path else None
            expected = proc(text=prompt, images=images, return_tensors="pt")["input_ids"][
                0
            ].tolist()
            assert ids[:k] == expected, sid
            checked += 1
    assert checked > 12  # multi-turn rows were among them


def test_answers_stop_on_the_tokenizers_eos_in_generate_and_in_the_pipeline(toy, sft_dir):
    model, proc = stock(sft_dir)
    tok = proc.tokenizer
    assert (
        tok.eos_token == "<|im_end|>"
        and model.generation_config.eos_token_id[0] == tok.eos_token_id
    )
    rows = json.load(open(f"{toy}/data/test.json"))[:8]
    pipe = transformers.pipeline("image-text-to-text", model=str(sft_dir))
    for row in rows:
        image = Image.open(f"{toy}/data/images/{row['image']}").convert("RGB")
        answer = len(tok(row["conversations"][1]["value"], add_special_tokens=False)["input_ids"])
        # lmms-eval's llava_hf: string content through the tokenizer's template, its eos, batch size
        # 1
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["conversations"][0]["value"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        out = model.generate(
            **inputs,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )[0, inputs["input_ids"].shape[1] :].tolist()
        assert tok.eos_token_id in out and 1 <= out.index(tok.eos_token_id) <= answer + 2, (
            tok.decode(out)
        )
        # the pipeline: typed content with the image, the saved generation config
        msgs = typed(row["conversations"][:1])
        msgs[0]["content"][0]["image"] = image
        text = pipe(text=msgs, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
        assert 1 <= len(tok(text, add_special_tokens=False)["input_ids"]) <= answer + 2, text


@pytest.mark.parametrize("stage", ["pt", "dpt", "sft", "dft"])
def test_pipeline_answers_on_every_stages_output(toy, student_dir, tmp_path, stage):
    teacher = ["--teacher", student_dir] if llava_kd.STAGES[stage]["teacher"] else []
    train(
        toy,
        stage,
        tmp_path,
        "--init",
        student_dir,
        "--max_steps",
        "1",
        "--global_batch_size",
        "4",
        "--batch_size",
        "4",
        *teacher,
    )
    pipe = transformers.pipeline("image-text-to-text", model=str(tmp_path))
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": f"{toy}/data/images/test_00000.png"},
                {"type": "text", "text": "What colour is the circle?"},
            ],
        }
    ]
    out = pipe(text=msgs, max_new_tokens=3, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)

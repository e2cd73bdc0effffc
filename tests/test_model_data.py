"""Model wrapper, stage freezing and the LLaVA data pipeline, on the offline toy setup."""

import json
import os

import pytest
import torch
import transformers
from conftest import logits
from PIL import Image

import chat
import checkpoints
import data
import errors
import llava_kd
import models
from data import LlavaDataset, collate
from errors import UserError


def student(toy):
    return models.build_student(f"{toy}/vision", f"{toy}/student_llm")


@pytest.fixture(scope="module")
def teacher_dir(toy, tmp_path_factory):
    model, proc = models.build_student(f"{toy}/vision", f"{toy}/teacher_llm")
    out = str(tmp_path_factory.mktemp("teacher"))
    checkpoints.save_checkpoint_files(model, proc, out)
    return out


def count_trainable(model):
    parts = {part: 0 for part in llava_kd.PARTS}
    for name, p in model.named_parameters():
        part = next(k for k, prefixes in llava_kd.PARTS.items() if name.startswith(prefixes))
        parts[part] += p.numel() if p.requires_grad else 0
    return parts


@pytest.mark.parametrize("stage", ["pt", "dpt", "sft", "dft"])
def test_stage_trains_exactly_its_parts(toy, teacher_dir, stage):
    model, proc = student(toy)
    teacher = (
        models.load_teacher(teacher_dir, model, proc) if llava_kd.STAGES[stage]["teacher"] else None
    )
    llava_kd.apply_stage(model, stage)
    n = count_trainable(model)
    sizes = {
        k: sum(p.numel() for name, p in model.named_parameters() if name.startswith(v))
        for k, v in llava_kd.PARTS.items()
    }
    assert n["vision"] == 0
    assert n["projector"] == sizes["projector"] > 0
    assert n["llm"] == (sizes["llm"] if stage in ("sft", "dft") else 0) and sizes["llm"] > 0
    if teacher is not None:
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert model.model.vision_tower is teacher.model.vision_tower  # one copy in memory


def test_build_student_loads_pretrained_parts_and_new_projector(toy):
    model, proc = student(toy)
    llm = transformers.AutoModelForCausalLM.from_pretrained(f"{toy}/student_llm")
    vision = transformers.SiglipVisionModel.from_pretrained(f"{toy}/vision")
    for k, v in llm.state_dict().items():
        key = (
            "lm_head." + k[len("lm_head.") :]
            if k.startswith("lm_head.")
            else "model.language_model." + k[len("model.") :]
        )
        assert torch.equal(model.state_dict()[key], v), k
    for k, v in vision.state_dict().items():
        assert torch.equal(model.state_dict()["model.vision_tower." + k], v), k
    c = model.config
    assert (c.vision_feature_select_strategy, c.vision_feature_layer, c.projector_hidden_act) == (
        "full",
        -2,
        "gelu",
    )
    assert c.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    v = c.vision_config
    # no CLS dropped
    assert c.image_seq_length == data.image_seq_length(proc) == (v.image_size // v.patch_size) ** 2


def test_loading_fails_loudly_on_missing_or_mis_shaped_weights(toy, tmp_path):
    from safetensors.torch import load_file, save_file

    llm = transformers.AutoModelForCausalLM.from_pretrained(f"{toy}/student_llm")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        os.symlink(f"{toy}/student_llm/{f}", tmp_path / f)
    weights = load_file(f"{toy}/student_llm/model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    llm.config.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="did not load.*layers.1.mlp.down_proj"):
        models.build_student(f"{toy}/vision", str(tmp_path))
    llm.config.intermediate_size += 8  # the checkpoint's MLP weights no longer fit this config
    llm.config.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatched|did not load"):
        models.build_student(f"{toy}/vision", str(tmp_path))


def test_incompatible_teacher_is_refused(toy, teacher_dir):
    model, proc = student(toy)
    teacher, t_proc = models.load_llava(teacher_dir)
    models.check_compatible(teacher, t_proc, model, proc)  # the toy pair is compatible
    teacher.config.image_token_id += 1
    with pytest.raises(ValueError, match="image token ids differ"):
        models.check_compatible(teacher, t_proc, model, proc)
    teacher.config.image_token_id -= 1
    t_proc.tokenizer.add_tokens(["<extra>"])
    proc.tokenizer.add_tokens(["<other>"])
    with pytest.raises(ValueError, match="tokenizers disagree"):
        models.check_compatible(teacher, t_proc, model, proc)
    _, proc = student(toy)
    proc.image_processor.size = {"height": 16, "width": 16}
    with pytest.raises(ValueError, match="visual tokens per image differ"):
        models.check_compatible(teacher, t_proc, model, proc)


# ---- data
# -----------------------------------------------------------------------------------------


def write(tmp_path, rows, images=("a.png",)):
    for name in images:
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / name)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    return str(path)


def turns(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


def labelled(ds, item):
    return ds.tok.decode(item["labels"][item["labels"] != data.IGNORE])


def test_pretrain_labels_are_the_caption_and_end_of_text(toy, tmp_path):
    _, proc = student(toy)
    path = write(
        tmp_path,
        [
            {
                "id": "p",
                "image": "a.png",
                "conversations": turns("<image>\nDescribe.", "a red square."),
            }
        ],
    )
    ds = LlavaDataset(path, str(tmp_path), proc, chat=False, max_length=200)
    item = ds[0]
    assert labelled(ds, item) == "a red square.<|endoftext|>"
    n = ds.n_image_tokens
    assert (item["input_ids"][:n] == proc.image_token_id).all() and (
        item["labels"][:n] == data.IGNORE
    ).all()
    assert item["pixel_values"].shape == (3, 32, 32)


def test_chat_labels_are_exactly_the_answers_with_end_tokens(toy, tmp_path):
    _, proc = student(toy)
    rows = [
        {"id": "single", "image": "a.png", "conversations": turns("<image>\nWhat colour?", "red")},
        {
            "id": "multi",
            "image": "a.png",
            "conversations": turns(
                "<image>\nWhat colour?", "red", "What shape?", "square", "Where?", "top left"
            ),
        },
        {"id": "text", "conversations": turns("What is the opposite of top?", "bottom")},
    ]
    ds = LlavaDataset(write(tmp_path, rows), str(tmp_path), proc, chat=True, max_length=300)
    assert labelled(ds, ds[0]) == "red<|im_end|>"
    assert labelled(ds, ds[1]) == "red<|im_end|>square<|im_end|>top left<|im_end|>"
    assert labelled(ds, ds[2]) == "bottom<|im_end|>"
    assert ds[2]["pixel_values"] is None and (ds[2]["input_ids"] != proc.image_token_id).all()
    # the labelled tokens are the chat template's own tokens of the answers, in place
    text = ds.tok.decode(ds[1]["input_ids"][ds[1]["input_ids"] != proc.image_token_id])
    assert text.endswith("<|im_start|>assistant\ntop left<|im_end|>\n")


def test_truncation_cuts_text_from_the_end_never_image_tokens(toy, tmp_path):
    _, proc = student(toy)
    rows = [
        {
            "id": "long",
            "image": "a.png",
            "conversations": turns("<image>\nWhat colour?", "red " * 50),
        }
    ]
    path = write(tmp_path, rows)
    n = data.image_seq_length(proc)
    item = LlavaDataset(path, str(tmp_path), proc, chat=True, max_length=n + 20)[0]
    assert (
        len(item["input_ids"]) == n + 20
        and int((item["input_ids"] == proc.image_token_id).sum()) == n
    )
    with pytest.raises(UserError, match="--max_length"):
        LlavaDataset(path, str(tmp_path), proc, chat=True, max_length=n)[0]


def test_visual_mask_and_mixed_batch_through_teacher_and_student(toy, teacher_dir):
    model, proc = student(toy)
    teacher = models.load_teacher(teacher_dir, model, proc)
    ds = LlavaDataset(f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=256)
    rows = [ds[i] for i in (0, 49, 1)]  # 49 is a text-only row of the toy set
    assert rows[1]["pixel_values"] is None and rows[0]["pixel_values"] is not None
    batch = collate(rows, proc.tokenizer.pad_token_id)
    mask = batch["input_ids"] == model.config.image_token_id
    assert mask.sum(1).tolist() == [ds.n_image_tokens, 0, ds.n_image_tokens]
    assert batch["pixel_values"].shape[0] == 2
    assert (
        batch["attention_mask"].sum(1) == torch.tensor([len(r["input_ids"]) for r in rows])
    ).all()
    z_v = llava_kd.vision_features(model, batch["pixel_values"])
    s = logits(model, batch["input_ids"], batch["attention_mask"], z_v)
    with torch.no_grad():
        t = logits(teacher, batch["input_ids"], batch["attention_mask"], z_v)
    loss, terms = llava_kd.distill_loss(s, t, batch["labels"], mask)
    assert (
        torch.isfinite(loss)
        and all(terms[k] > 0 for k in ("L_res", "L_vis", "L_rel"))
        and terms["L_pro"] == 0
    )
    # the shared-vision path gives what the stock forward (pixel_values in) gives
    ref = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    torch.testing.assert_close(s, ref)


BAD = [
    (
        {"id": "x1", "image": "missing.png", "conversations": turns("<image>\nQ?", "A")},
        "x1: image file .*not found",
    ),
    (
        {"id": "x2", "conversations": turns("<image>\nQ?", "A")},
        "x2: <image> in the text of a sample with no 'image'",
    ),
    (
        {"id": "x3", "image": "a.png", "conversations": turns("<image>\nQ?", "A")[::-1]},
        "x3: turns must alternate",
    ),
    (
        {"id": "x4", "image": "a.png", "conversations": turns("<image>\nQ?")},
        "x4: turns must alternate",
    ),
    ({"id": "x5", "image": "a.png", "conversations": []}, "x5: empty or missing 'conversations'"),
    (
        {"id": "x6", "image": ["a.png", "a.png"], "conversations": turns("<image>\nQ?", "A")},
        "x6: one image per sample",
    ),
    (
        {"id": "x7", "image": "a.png", "conversations": turns("<image>\n<image>\nQ?", "A")},
        "x7: one image per sample",
    ),
]


@pytest.mark.parametrize("row,message", BAD, ids=[r["id"] for r, _ in BAD])
def test_bad_samples_raise_naming_file_and_id(toy, tmp_path, row, message):
    _, proc = student(toy)
    path = write(
        tmp_path, [{"id": "ok", "image": "a.png", "conversations": turns("<image>\nQ?", "A")}, row]
    )
    with pytest.raises(UserError, match=message) as e:
        LlavaDataset(path, str(tmp_path), proc, chat=True, max_length=200)
    assert str(e.value).startswith(f"{path}: sample ") and "\n" not in str(e.value)


def test_a_file_that_is_not_a_list_and_many_bad_samples(toy, tmp_path):
    _, proc = student(toy)
    # what was found and what belongs there, for each kind of JSON value that is not a list
    for value, found in [
        ({"id": "x", "conversations": []}, "an object with keys ['id', 'conversations']"),
        ({"train": [1, 2]}, "an object with keys ['train']"),
        ("samples", "'samples'"),
        (3, "3"),
    ]:
        (tmp_path / "obj.json").write_text(json.dumps(value))
        with pytest.raises(UserError) as e:
            LlavaDataset(str(tmp_path / "obj.json"), str(tmp_path), proc, chat=True, max_length=9)
        assert str(e.value) == (
            f'{tmp_path}/obj.json: {found}, where a JSON list of samples belongs ([{{"id", '
            f'"image", "conversations"}}, ...]; or JSON Lines, one sample a line)'
        )
    rows = [{"id": f"b{i}", "conversations": []} for i in range(25)]
    with pytest.raises(UserError) as e:
        LlavaDataset(write(tmp_path, rows), str(tmp_path), proc, chat=True, max_length=200)
    lines = str(e.value).splitlines()
    # the first 20 named
    assert "25 bad sample(s)" in lines[0] and len(lines) == 1 + 20 + 1 and lines[-1] == "  ..."
    assert lines[20] == "  sample b19: empty or missing 'conversations'"


def test_a_chat_stage_needs_a_template_that_renders_a_llava_prompt(toy, tmp_path):
    model, proc = student(toy)
    path = write(
        tmp_path, [{"id": "ok", "image": "a.png", "conversations": turns("<image>\nQ?", "A")}]
    )
    proc.chat_template = proc.tokenizer.chat_template = None
    with pytest.raises(
        UserError,
        match="sft/dft render conversations with the model's chat template, and its "
        "processor and tokenizer have none",
    ):
        LlavaDataset(path, str(tmp_path), proc, chat=True, max_length=200)
    LlavaDataset(path, str(tmp_path), proc, chat=False, max_length=200)  # pt/dpt need none
    proc.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # no content at all
    with pytest.raises(
        errors.UserError, match="^where: its chat template renders neither string nor typed content"
    ):
        chat.prepare_chat(proc, model.generation_config, "where")


def test_image_without_tag_is_put_at_the_start_of_the_first_human_turn(toy, tmp_path, capsys):
    _, proc = student(toy)
    rows = [
        {"id": "m", "image": "a.png", "conversations": turns("What colour?", "red")},
        {"id": "n", "image": "a.png", "conversations": turns("What colour? <image>", "red")},
    ]
    ds = LlavaDataset(write(tmp_path, rows), str(tmp_path), proc, chat=True, max_length=200)
    assert "in 2 sample(s)" in capsys.readouterr().out
    for item in (ds[0], ds[1]):
        ids = item["input_ids"].tolist()
        first = ids.index(proc.image_token_id)
        assert (
            ds.tok.decode(ids[:first]) == "<|im_start|>user\n"
            and labelled(ds, item) == "red<|im_end|>"
        )


def test_unreadable_images_are_named_by_id_before_and_while_training(toy, tmp_path):
    """Headers are read with the samples: a file that is no image, or one above PIL's pixel limit.
    An image whose header is fine but whose pixels are cut short is found when its batch is made:
    the row carries the error (the loop checkpoints and stops on it)."""
    _, proc = student(toy)
    rows = [
        {"id": f"s{i}", "image": f"{i}.png", "conversations": turns("<image>\nQ?", "A")}
        for i in range(3)
    ]
    path = write(tmp_path, rows)
    (tmp_path / "0.png").write_bytes(b"not a png")
    Image.new("1", (20000, 5000)).save(tmp_path / "1.png")  # 100 megapixels: above PIL's 89
    Image.new("RGB", (64, 64), "red").save(tmp_path / "2.png")
    with pytest.raises(UserError) as e:
        data.read_samples(path, str(tmp_path))
    assert f"sample s0: image file {tmp_path}/0.png cannot be read" in str(e.value)
    assert f"sample s1: image file {tmp_path}/1.png has 100 megapixels, above PIL's" in str(e.value)
    assert "s2" not in str(e.value)
    full = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(full[: len(full) // 2])  # the header survives
    ds = LlavaDataset(
        path,
        str(tmp_path),
        proc,
        chat=True,
        max_length=200,
        samples=[("s2", str(tmp_path / "2.png"), rows[2]["conversations"])],
    )
    row = ds[0]
    assert row["error"].startswith(f"{path}: sample s2: cannot decode image {tmp_path}/2.png (")
    assert collate([row], 0) == {"errors": [row["error"]]}


def test_saved_student_loads_in_stock_transformers_and_answers(toy, tmp_path):
    model, proc = student(toy)
    checkpoints.save_checkpoint_files(model, proc, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    proc = transformers.AutoProcessor.from_pretrained(tmp_path)
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    image = Image.open(f"{toy}/data/images/test_00000.png")
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    assert (
        int((inputs["input_ids"] == model.config.image_token_id).sum())
        == model.config.image_seq_length
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = proc.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # untrained: any text
    assert out.shape[1] > inputs["input_ids"].shape[1] and isinstance(text, str) and len(text) > 0


def test_each_process_checks_the_image_files_of_its_share(tmp_path):
    """Of 2 processes, each stats and opens the images of every other sample: a missing file is
    found by the process whose share holds it (run_on_every_process then stops both with its
    message)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [
        {
            "id": f"s{i}",
            "image": "a.png" if i != 3 else "gone.png",
            "conversations": turns("Q?", "A"),
        }
        for i in range(4)
    ]
    path = write(tmp_path, rows)
    assert len(data.read_samples(path, str(tmp_path), rank=0, world=2)) == 4
    with pytest.raises(UserError, match="sample s3: image file .*gone.png not found"):
        data.read_samples(path, str(tmp_path), rank=1, world=2)


@pytest.mark.parametrize("chat_form", [True, False])
def test_a_data_set_renders_its_first_rows_once_and_gives_the_same_items_every_epoch(
    toy, ckpts, monkeypatch, chat_form
):
    """The tokens of the first CACHED rows asked for are kept: every epoch's items equal those
    rendered afresh, a reader that changes what it got changes nothing kept, no more rows kept."""
    _, proc = models.load_llava(ckpts / "student")
    split = "sft" if chat_form else "pretrain"
    where = (f"{toy}/data/{split}.json", f"{toy}/data/images", proc, chat_form, 4096)
    order = (3, 0, 7, 3, 1, 9, 0, 2, 11)
    monkeypatch.setattr(data, "CACHED", 0)
    fresh = LlavaDataset(*where)
    want = {i: fresh[i] for i in order}
    assert fresh.cached == {}
    monkeypatch.setattr(data, "CACHED", 5)
    kept = LlavaDataset(*where)
    for epoch in range(2):
        for i in order:
            got = kept[i]
            assert torch.equal(got["input_ids"], want[i]["input_ids"]), (epoch, i)
            assert torch.equal(got["labels"], want[i]["labels"]), (epoch, i)
    ids, labels = kept.tokens(3)
    ids.append(-5)
    labels[0] = -5
    assert kept.tokens(3) == fresh.tokens(3)
    assert sorted(kept.cached) == [0, 1, 3, 7, 9]

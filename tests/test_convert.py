"""convert_tinyllava.py: a tiny TinyLLaVA_Factory checkpoint (its config fields and key names, both
layouts) converted to a stock LLaVA directory, checked against a forward written here from
TinyLLaVA's semantics."""

import json
import os

import numpy
import pytest
import torch
import transformers
from conftest import Forked, ended
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import convert_tinyllava
import llava_kd
import models as llava_models

SIGLIP = dict(
    model_type="siglip_vision_model",
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
CLIP = dict(SIGLIP, model_type="clip_vision_model")
QWEN2 = dict(
    model_type="qwen2",
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
# SigLIP's own: no crop key
SIGLIP_PROCESSOR = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
CLIP_PROCESSOR = transformers.CLIPImageProcessorPil(
    size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
)


def tinyllava_tokenizer(toy):
    """Qwen-like: byte-level BPE with <|endoftext|> (eos and pad), <|im_end|>, and no <image>:
    TinyLLaVA splices -200."""
    texts = [
        c["value"] for r in json.load(open(f"{toy}/data/sft.json")) for c in r["conversations"]
    ]
    texts.append(convert_tinyllava.SYSTEM)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_end|>"],
    )


def tinyllava_parts(tower="siglip"):
    torch.manual_seed(0)
    llm = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**{k: v for k, v in QWEN2.items() if k != "model_type"})
    )
    cls, cfg = (
        (transformers.SiglipVisionModel, transformers.SiglipVisionConfig)
        if tower == "siglip"
        else (transformers.CLIPVisionModel, transformers.CLIPVisionConfig)
    )
    tower = cls(
        cfg(
            **{
                k: v
                for k, v in (SIGLIP if tower == "siglip" else CLIP).items()
                if k != "model_type"
            }
        )
    )
    # mlp2x_gelu
    connector = torch.nn.Sequential(
        torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)
    )
    for p in connector.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return llm, tower, connector


def write_tinyllava(
    out,
    toy,
    split,
    aspect="pad",
    tower="siglip",
    llm_dtype=torch.float32,
    processor=None,
    head_bias=False,
    tied=True,
):
    """A TinyLLaVA_Factory directory: config.json (the fields real checkpoints carry: text_config
    says bfloat16 whatever the weights are), tokenizer, the weights whole or in part folders, and
    the tower's processor if given."""
    llm, tower_model, connector = tinyllava_parts(tower)
    llm.to(llm_dtype)
    os.makedirs(out, exist_ok=True)
    config = dict(
        model_type="tinyllava",
        architectures=["TinyLlavaForConditionalGeneration"],
        llm_model_name_or_path="Qwen/Qwen2-0.5B",
        vision_model_name_or_path="google/siglip-so400m-patch14-384",
        connector_type="mlp2x_gelu",
        text_config=dict(QWEN2, torch_dtype="bfloat16"),
        vision_config=SIGLIP if tower == "siglip" else CLIP,
        hidden_size=32,
        vocab_size=512,
        vision_hidden_size=32,
        vision_feature_layer=-2,
        vision_feature_select_strategy="patch",
        image_token_index=-200,
        ignore_index=-100,
        image_aspect_ratio=aspect,
        pad_token="<|endoftext|>",
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
        tokenizer_use_fast=False,
    )
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    tinyllava_tokenizer(toy).save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    language = {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight" or not tied}
    if head_bias:  # Phi-2's head
        language["lm_head.bias"] = torch.zeros(QWEN2["vocab_size"])
    parts = {
        # the tower's names as transformers 4 saved them (real checkpoints)
        "language_model": language,
        "vision_tower": {"vision_model." + k: v for k, v in tower_model.state_dict().items()},
        "connector": {"_connector." + k: v for k, v in connector.state_dict().items()},
    }
    if split:  # the pretrain stage's layout: one folder per part, pytorch_model.bin in each
        for part, state in parts.items():
            os.makedirs(os.path.join(out, part), exist_ok=True)
            torch.save(state, os.path.join(out, part, "pytorch_model.bin"))
    else:
        prefix = convert_tinyllava.PARTS
        save_file(
            {prefix[p] + k: v.contiguous() for p, s in parts.items() for k, v in s.items()},
            os.path.join(out, "model.safetensors"),
            metadata={"format": "pt"},
        )
    return llm, tower_model, connector


def tinyllava_pixels(image, processor):
    """TinyLLaVA's preprocessing, as data/image_preprocess.py and the tower's processor read: pad to
    a square in the mean colour, then resize with PIL's bicubic (CLIP: the shortest edge, then a
    centre crop), scale, normalise."""
    side = max(image.size)
    # expand2square
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in processor.image_mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    x = torch.tensor(numpy.asarray(square.resize((32, 32), Image.BICUBIC)), dtype=torch.float32)
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    return ((x / 255 - mean) / std).permute(2, 0, 1)[None]


def tinyllava_prompt(questions_answers, template):
    """data/template/base.py's _prompt: the system text, then per turn the user and assistant
    formats; a question holding <image> loses it, is stripped, gets "<image>\n" first, and is
    stripped again."""
    if template == "pretrain":
        return "".join(
            "<image>" + (a + "\n" if a is not None else "") for _, a in questions_answers
        )
    end = convert_tinyllava.TEMPLATES[template]
    msg = convert_tinyllava.SYSTEM + " "
    for q, a in questions_answers:
        if "<image>" in q:
            q = ("<image>\n" + q.replace("<image>", "").strip()).strip()
        msg += "USER: " + q + " " + ("ASSISTANT: " + a + end if a is not None else "ASSISTANT:")
    return msg


def tinyllava_ids(prompt, tok):
    """tokenizer_image_token: each piece between <image> tags tokenized alone, the placeholder -200
    between."""
    pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in prompt.split("<image>")]
    return sum(([-200] + p for p in pieces[1:]), pieces[0])


def reference_logits(parts, tok, prompt, pixels):
    """TinyLLaVA's forward: hidden_states[-2] without its first token, connector, spliced where
    <image> was, the LLM."""
    llm, tower, connector = parts
    feats = connector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    before, after = (
        tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        for t in prompt.split("<image>")
    )
    emb = llm.get_input_embeddings()
    embeds = torch.cat([emb(before), feats.to(emb.weight.dtype), emb(after)], 1)
    return llm(inputs_embeds=embeds).logits


def noise_image(w=64, h=40, seed=0):  # not square and larger than the tower: the resize is real
    return Image.fromarray(
        numpy.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=numpy.uint8)
    )


def generation_prompt(proc, question):
    return proc.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def collapsed_ids(
    input_ids, image_id
):  # the processor's ids with each run of image tokens as TinyLLaVA's -200
    out = []
    for i in input_ids.tolist():
        if not (i == image_id and out and out[-1] == -200):
            out.append(-200 if i == image_id else i)
    return out


CASES = {  # tower, where its processor comes from, layout -> the image tokens per image
    "siglip-own-processor": ("siglip", "src", False, 15),
    "siglip-image-processor-flag": ("siglip", "flag", False, 15),
    "siglip-no-processor": ("siglip", None, False, 15),
    "clip-with-cls": ("clip", "src", False, 16),
    "split-pretrain-folders": ("siglip", "src", True, 15),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_equals_tinyllavas_forward(toy, tmp_path, case):
    """Pixels (a real PIL resize, no crop for SigLIP), prompt ids and logits equal TinyLLaVA's."""
    tower, where, split, n_image = CASES[case]
    processor = SIGLIP_PROCESSOR if tower == "siglip" else CLIP_PROCESSOR
    parts = write_tinyllava(
        tmp_path / "src", toy, split, tower=tower, processor=processor if where == "src" else None
    )
    if where == "flag":
        processor.save_pretrained(tmp_path / "tower")
    convert_tinyllava.convert(
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        str(tmp_path / "tower") if where == "flag" else None,
    )
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert (
        model.config.vision_feature_select_strategy == "default"
        and model.config.vision_feature_layer == -2
    )
    template = "pretrain" if split else "phi"
    prompt = generation_prompt(proc, "<image>\nWhat colour is the circle?")
    assert prompt == tinyllava_prompt([("<image>\nWhat colour is the circle?", None)], template)
    image = noise_image()
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    assert (
        int((inputs["input_ids"] == model.config.image_token_id).sum())
        == n_image
        == model.config.image_seq_length
    )
    assert collapsed_ids(inputs["input_ids"][0], model.config.image_token_id) == tinyllava_ids(
        prompt, proc.tokenizer
    )
    pixels = tinyllava_pixels(image, processor)
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(
            logits, reference_logits(parts, proc.tokenizer, prompt, pixels), rtol=1e-5, atol=1e-5
        )


class ForceAfter(
    transformers.LogitsProcessor
):  # the model says `token` at its second new token, whatever it would
    def __init__(self, start, token):
        self.start, self.token = start, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.start + 1:
            scores[:] = -float("inf")
            scores[:, self.token] = 0
        return scores


@pytest.mark.parametrize("template", ["phi", "qwen2_base", "qwen2_instruct", "pretrain"])
def test_template_prompts_ids_and_where_generation_stops(toy, tmp_path, template):
    """Every placement of <image> in a question gives TinyLLaVA's prompt and token ids; an answer
    ends on the template's end, which is where generation stops (the tokenizer's eos too, for
    clients that stop on it)."""
    write_tinyllava(tmp_path / "src", toy, split=False, processor=SIGLIP_PROCESSOR)
    convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"), template=template)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    image, end = noise_image(), convert_tinyllava.TEMPLATES[template]
    for q in ("<image>\nQ?", "Q?\n<image>", "<image>Q?", "<image>\n Q? \n", "Q <image> more?"):
        prompt = generation_prompt(proc, q)
        assert prompt == tinyllava_prompt([(q, None)], template), q
        ids = proc(images=image, text=prompt, return_tensors="pt")["input_ids"][0]
        assert collapsed_ids(ids, model.config.image_token_id) == tinyllava_ids(
            prompt, proc.tokenizer
        ), q
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert proc.apply_chat_template(
        typed, add_generation_prompt=True, tokenize=False
    ) == generation_prompt(proc, "<image>\nQ?")
    turns = [("<image>\nQ?", "red"), ("And the shape?", "a circle")]
    messages = [
        m
        for q, a in turns
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    assert proc.apply_chat_template(messages, tokenize=False) == tinyllava_prompt(turns, template)
    end_id = proc.tokenizer.convert_tokens_to_ids(proc.tokenizer.tokenize(end))[0]
    assert model.generation_config.eos_token_id[0] == end_id
    if template != "pretrain":
        assert proc.tokenizer.eos_token == end
    inputs = proc(images=image, text=generation_prompt(proc, "<image>\nQ?"), return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        logits_processor=transformers.LogitsProcessorList([ForceAfter(start, end_id)]),
    )
    # stopped right after the template's end
    assert out.shape[1] == start + 2 and out[0, -1] == end_id


@pytest.mark.parametrize("llm_dtype", [torch.float32, torch.bfloat16])
def test_every_part_keeps_the_sources_dtype(toy, tmp_path, llm_dtype):
    """Both configs say bfloat16; the weights decide. Each part is saved in the source's dtype, and
    dtype="auto" loads every value as the source has it (in the widest of the parts' dtypes: no part
    is rounded)."""
    llm, tower, connector = write_tinyllava(
        tmp_path / "src", toy, split=False, llm_dtype=llm_dtype, processor=SIGLIP_PROCESSOR
    )
    convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"))
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if "language_model" in k} == {
        "BF16" if llm_dtype == torch.bfloat16 else "F32"
    }
    assert {d for k, d in dtypes.items() if "language_model" not in k} == {"F32"}
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "out", dtype="auto"
    ).state_dict()
    src = {
        **{
            "model.language_model." + k[len("model.") :]: v
            for k, v in llm.state_dict().items()
            if k.startswith("model.")
        },
        **{"model.vision_tower." + k: v for k, v in tower.state_dict().items()},
        "model.multi_modal_projector.linear_1.weight": connector[0].weight,
    }
    for k, v in src.items():
        # + the <image> row
        w = loaded[k][: v.shape[0]] if k.endswith("embed_tokens.weight") else loaded[k]
        assert w.dtype == torch.float32 and torch.equal(w, v.detach().float()), k


def test_unsupported_sources_are_refused_in_one_line(toy, tmp_path):
    write_tinyllava(tmp_path / "phi2", toy, split=False, head_bias=True)
    p = Forked([str(tmp_path / "phi2"), str(tmp_path / "out")], {}, convert_tinyllava.main)
    (output,) = ended([p])
    assert p.returncode == 1 and output.strip().count("\n") == 0 and "lm_head.bias" in output, (
        output
    )
    assert not os.path.exists(tmp_path / "out")
    write_tinyllava(tmp_path / "src", toy, split=False)
    with pytest.raises(
        SystemExit,
        match=r"--template llama ends answers on </s>, which its tokenizer does not have",
    ):
        convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"), template="llama")
    cfg = json.load(open(tmp_path / "src" / "config.json"))
    json.dump(
        dict(cfg, vision_config=dict(SIGLIP, model_type="dinov2")),
        open(tmp_path / "src" / "config.json", "w"),
    )
    with pytest.raises(
        SystemExit, match=r"vision tower 'dinov2': only SigLIP and CLIP towers are supported"
    ):
        convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"))


def test_a_source_whose_keys_do_not_map_is_refused_naming_them(toy, tmp_path):
    write_tinyllava(tmp_path / "src", toy, split=False)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "src" / "model.safetensors")
    state["connector._connector.4.weight"] = torch.zeros(2, 2)  # a third layer: not mlp2x_gelu
    del state["language_model.model.norm.weight"]
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        SystemExit, match=r"1 source keys map to no LLaVA key.*connector._connector.4.weight"
    ):
        convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"))
    del state["connector._connector.4.weight"]
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"missing \['model.language_model.norm.weight'\]"):
        convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"))


def test_converted_directory_is_a_teacher_and_an_init_for_the_stages(toy, tmp_path):
    llm, _, _ = write_tinyllava(tmp_path / "src", toy, split=False, aspect="square")
    convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "tinyllava"))
    llm.save_pretrained(tmp_path / "llm")  # a new student's LLM, of the teacher's tokenizer
    tinyllava_tokenizer(toy).save_pretrained(tmp_path / "llm")
    d = str(tmp_path / "tinyllava")
    common = [
        "--images",
        f"{toy}/data/images",
        "--workers",
        "0",
        "--global_batch_size",
        "4",
        "--batch_size",
        "2",
        "--max_steps",
        "2",
        "--max_length",
        "256",
    ]
    llava_kd.main(
        [
            "train",
            "--stage",
            "dpt",
            "--data",
            f"{toy}/data/pretrain.json",
            "--vision",
            d,
            "--llm",
            str(tmp_path / "llm"),
            "--teacher",
            d,
            "--out",
            str(tmp_path / "dpt"),
            *common,
        ]
    )
    llava_kd.main(
        [
            "train",
            "--stage",
            "dft",
            "--data",
            f"{toy}/data/sft.json",
            "--init",
            d,
            "--teacher",
            d,
            "--out",
            str(tmp_path / "dft"),
            *common,
        ]
    )
    dpt = [json.loads(line) for line in open(tmp_path / "dpt" / "log.jsonl")]
    dft = [json.loads(line) for line in open(tmp_path / "dft" / "log.jsonl")]
    # a new projector: it differs
    assert len(dpt) == 2 and all(r["L_res"] > 0 and r["L_vis"] > 0 for r in dpt)
    # its own teacher: KL 0 at the start
    assert len(dft) == 2 and dft[0]["L_reg"] > 0 and dft[0]["L_res"] < 1e-6
    _, proc = llava_models.load_llava(tmp_path / "dpt")
    assert proc.apply_chat_template(
        [{"role": "user", "content": "<image>\nQ?"}], add_generation_prompt=True, tokenize=False
    ).startswith(convert_tinyllava.SYSTEM)  # the teacher's format


def test_a_source_without_a_feature_layer_takes_tinyllavas_default(toy, tmp_path):
    """TinyLLaVA reads the tower's second-to-last layer unless its config says otherwise."""
    write_tinyllava(tmp_path / "src", toy, False)
    path = tmp_path / "src" / "config.json"
    config = json.load(open(path))
    del config["vision_feature_layer"]
    path.write_text(json.dumps(config))
    convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"), None)
    converted = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert converted.vision_feature_layer == -2

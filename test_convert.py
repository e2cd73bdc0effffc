"""convert_tinyllava.py: a tiny TinyLLaVA_Factory checkpoint (its config fields and key names, both layouts)
converted to a stock LLaVA directory, checked against a forward written here from TinyLLaVA's semantics."""
import json
import os

import numpy
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import convert_tinyllava
import llava_kd

SIGLIP = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=2)
QWEN2 = dict(model_type="qwen2", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def tinyllava_tokenizer(toy):
    """Qwen-like: byte-level BPE with <|endoftext|> (eos and pad) and no <image>: TinyLLaVA splices -200."""
    texts = [c["value"] for r in json.load(open(f"{toy}/data/sft.json")) for c in r["conversations"]]
    texts.append(convert_tinyllava.SYSTEM)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tinyllava_parts():
    torch.manual_seed(0)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: v for k, v in QWEN2.items() if k != "model_type"}))
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        **{k: v for k, v in SIGLIP.items() if k != "model_type"}))
    connector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))  # mlp2x_gelu
    for p in connector.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return llm, tower, connector


def write_tinyllava(out, toy, split, aspect="pad"):
    """A TinyLLaVA_Factory directory: config.json, tokenizer, and the weights whole or in part folders."""
    llm, tower, connector = tinyllava_parts()
    os.makedirs(out, exist_ok=True)
    config = dict(model_type="tinyllava", architectures=["TinyLlavaForConditionalGeneration"],
                  llm_model_name_or_path="Qwen/Qwen2-0.5B", vision_model_name_or_path="google/siglip-so400m-patch14-384",
                  connector_type="mlp2x_gelu", text_config=QWEN2, vision_config=SIGLIP, hidden_size=32, vocab_size=512,
                  vision_hidden_size=32, vision_feature_layer=-2, vision_feature_select_strategy="patch",
                  image_token_index=-200, ignore_index=-100, image_aspect_ratio=aspect, pad_token="<|endoftext|>",
                  tokenizer_padding_side="right", tokenizer_model_max_length=2048, tokenizer_use_fast=False)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    tinyllava_tokenizer(toy).save_pretrained(out)
    parts = {"language_model": {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"},  # tied
             "vision_tower": tower.state_dict(), "connector": {"_connector." + k: v for k, v in connector.state_dict().items()}}
    if split:  # the pretrain stage's layout: one folder per part, pytorch_model.bin in each
        for part, state in parts.items():
            os.makedirs(os.path.join(out, part), exist_ok=True)
            torch.save(state, os.path.join(out, part, "pytorch_model.bin"))
    else:
        prefix = convert_tinyllava.PARTS
        save_file({prefix[p] + k: v.contiguous() for p, s in parts.items() for k, v in s.items()},
                  os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return llm, tower, connector


def reference_logits(parts, tok, prompt, image):
    """TinyLLaVA's forward, as its code reads: pad to square in the mean colour, SigLIP preprocessing,
    hidden_states[-2] without its first token, connector, features spliced where <image> was, the LLM."""
    llm, tower, connector = parts
    side = max(image.size)
    square = Image.new("RGB", (side, side), (127, 127, 127))  # expand2square, int(0.5 * 255)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    x = torch.tensor(numpy.asarray(square.resize((32, 32), Image.BICUBIC)), dtype=torch.float32)
    pixels = ((x / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    feats = connector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    before, after = (tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in prompt.split("<image>"))
    emb = llm.get_input_embeddings()
    return llm(inputs_embeds=torch.cat([emb(before), feats, emb(after)], 1)).logits, pixels


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split-folders"])
def test_converted_model_equals_tinyllavas_forward_and_generates(toy, tmp_path, split):
    parts = write_tinyllava(tmp_path / "src", toy, split)
    convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert model.config.vision_feature_select_strategy == "default" and model.config.vision_feature_layer == -2
    assert model.config.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>") >= 0
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": "What colour is the circle?"}]}],
                                      add_generation_prompt=True, tokenize=False)
    assert prompt == convert_tinyllava.SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT:"
    image = Image.open(f"{toy}/data/images/test_00001.png").convert("RGB").crop((0, 0, 32, 20))  # not square: "pad"
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 15  # 16 patches, the first dropped
    with torch.no_grad():
        ref, ref_pixels = reference_logits(parts, proc.tokenizer, prompt, image)
        torch.testing.assert_close(inputs["pixel_values"], ref_pixels, rtol=0, atol=1e-6)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # a full turn ends on <|endoftext|>, the tokenizer's eos: clients that stop on it stop after an answer
    turn = proc.apply_chat_template([{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "red"}],
                                    tokenize=False)
    assert turn.endswith(" USER: <image>\nQ? ASSISTANT: red<|endoftext|>") and proc.tokenizer.eos_token == "<|endoftext|>"


def test_a_source_whose_keys_do_not_map_is_refused_naming_them(toy, tmp_path):
    write_tinyllava(tmp_path / "src", toy, split=False)
    from safetensors.torch import load_file
    state = load_file(tmp_path / "src" / "model.safetensors")
    state["connector._connector.4.weight"] = torch.zeros(2, 2)  # a third layer: not mlp2x_gelu
    del state["language_model.model.norm.weight"]
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"1 source keys map to no LLaVA key.*connector._connector.4.weight"):
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
    common = ["--images", f"{toy}/data/images", "--workers", "0", "--global_batch_size", "4", "--batch_size", "2",
              "--max_steps", "2", "--max_length", "256"]
    llava_kd.main(["train", "--stage", "dpt", "--data", f"{toy}/data/pretrain.json", "--vision", d,
                   "--llm", str(tmp_path / "llm"), "--teacher", d, "--out", str(tmp_path / "dpt"), *common])
    llava_kd.main(["train", "--stage", "dft", "--data", f"{toy}/data/sft.json", "--init", d, "--teacher", d,
                   "--out", str(tmp_path / "dft"), *common])
    dpt = [json.loads(line) for line in open(tmp_path / "dpt" / "log.jsonl")]
    dft = [json.loads(line) for line in open(tmp_path / "dft" / "log.jsonl")]
    assert len(dpt) == 2 and all(r["L_res"] > 0 and r["L_vis"] > 0 for r in dpt)  # a new projector: it differs
    assert len(dft) == 2 and dft[0]["L_reg"] > 0 and dft[0]["L_res"] < 1e-6  # its own teacher: KL 0 at the start
    _, proc = llava_kd.load_llava(tmp_path / "dpt")
    assert proc.apply_chat_template([{"role": "user", "content": "<image>\nQ?"}], add_generation_prompt=True,
                                    tokenize=False).startswith(convert_tinyllava.SYSTEM)  # the teacher's format

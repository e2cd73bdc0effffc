"""TinyLLaVA_Factory checkpoint -> stock transformers LLaVA directory (LlavaForConditionalGeneration + LlavaProcessor).

    python convert_tinyllava.py SRC_DIR OUT_DIR [--image_processor DIR]

The format, as TinyLLaVA_Factory (github.com/TinyLLaVA/TinyLLaVA_Factory) writes it:
- tinyllava/model/modeling_tinyllava.py: a TinyLlavaForConditionalGeneration with three parts, `language_model`
  (a causal LM), `vision_tower._vision_tower` (SiglipVisionModel / CLIPVisionModel), `connector._connector`
  (connector/mlp.py, "mlp2x_gelu": Linear, GELU, Linear). Saved whole (model.safetensors, possibly sharded, or
  pytorch_model.bin), or, after its pretrain stage, as language_model/, vision_tower/, connector/ folders each
  holding its part's own state dict (load_model.py).
- vision_tower/base.py: features = hidden_states[vision_feature_layer] (-2), and "patch" drops the first token
  even for SigLIP, which has no CLS (729 patches -> 728 tokens): transformers' "default" strategy.
- config.json (configuration_tinyllava.py): image_token_index -200 is a placeholder spliced in by
  tokenizer_image_token, never a vocabulary id; image_aspect_ratio "pad" pads to a square in the processor's
  mean colour before resizing (data/image_preprocess.py expand2square).
- data/template/phi_template.py, qwen2_base_template.py: a fixed system sentence, then per turn
  "USER: <image>\\n{question} ASSISTANT: {answer}<|endoftext|>"; a generation prompt ends on "ASSISTANT:".
"""
import argparse
import json
import os

import torch
import transformers
from safetensors import safe_open

import llava_kd

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
# TinyLLaVA's "phi" / "qwen2_base" prompt as a chat template (llava_kd.prepare_chat makes it take typed content)
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{%- if loop.first %}{{ '" + SYSTEM.replace("'", "\\'") + " ' }}{% endif -%}"
    "{%- if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{%- elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + '<|endoftext|>' }}{% endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif -%}")

# source prefix -> target prefix (module names of LlavaForConditionalGeneration in transformers 5)
KEY_MAP = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower._vision_tower.", "model.vision_tower."),
    ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector._connector.2.", "model.multi_modal_projector.linear_2."),
]
PARTS = {"language_model": "language_model.", "vision_tower": "vision_tower._vision_tower.", "connector": "connector."}


def read_weights(folder):
    """The state dict in a folder: model.safetensors (or its shards, by the index) or pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index) or os.path.isfile(os.path.join(folder, "model.safetensors")):
        names = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
        state = {}
        for name in names:
            with safe_open(os.path.join(folder, name), "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        return state
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise SystemExit(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_source(src):
    """The whole model's state dict with TinyLLaVA's key names, from either layout."""
    if all(os.path.isdir(os.path.join(src, part)) for part in PARTS):  # the pretrain stage's split folders
        return {prefix + k: v for part, prefix in PARTS.items() for k, v in read_weights(os.path.join(src, part)).items()}
    return read_weights(src)


def map_keys(state):
    """TinyLLaVA names -> LLaVA names; stops naming every key that maps to nothing."""
    out, unmapped = {}, []
    for k, v in state.items():
        src = next((s for s, _ in KEY_MAP if k.startswith(s)), None)
        if src is None:
            unmapped.append(k)
        else:
            out[dict(KEY_MAP)[src] + k[len(src):]] = v
    if unmapped:
        raise SystemExit(f"{len(unmapped)} source keys map to no LLaVA key (is this a TinyLLaVA mlp2x_gelu "
                         f"checkpoint?): {unmapped[:10]}")
    return out


def image_processor(src, aspect, vision, path=None):
    """The tower's image processor (SRC's own, --image_processor, or SigLIP's standard one), padding to a
    square in its mean colour first when the source trained with image_aspect_ratio "pad"."""
    where = path or (src if os.path.isfile(os.path.join(src, "preprocessor_config.json")) else None)
    if where:
        proc = transformers.AutoImageProcessor.from_pretrained(where)
        kw = {k: v for k, v in proc.to_dict().items() if k in ("size", "image_mean", "image_std", "resample",
                                                               "do_center_crop", "crop_size", "rescale_factor")}
    elif vision.model_type in ("siglip_vision_model", "siglip"):  # SigLIP: resize, [-1, 1]
        side = vision.image_size
        kw = dict(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
                  do_center_crop=False)
    else:
        raise SystemExit(f"{src}: no preprocessor_config.json; give the vision tower's with --image_processor DIR")
    if aspect not in ("square", "pad"):
        raise SystemExit(f"{src}: image_aspect_ratio {aspect!r} cannot be expressed by a LLaVA processor "
                         f"(only 'square' and 'pad')")
    return transformers.LlavaImageProcessorPil(do_pad=aspect == "pad", **kw)


def convert(src, out, image_processor_dir=None):
    cfg = json.load(open(os.path.join(src, "config.json")))
    if cfg.get("model_type") != "tinyllava":
        raise SystemExit(f"{src}: model_type is {cfg.get('model_type')!r}, not 'tinyllava'")
    if cfg.get("connector_type") != "mlp2x_gelu":
        raise SystemExit(f"{src}: connector_type {cfg.get('connector_type')!r}; only mlp2x_gelu maps onto LLaVA")
    if cfg.get("vision_feature_select_strategy", "patch") != "patch":
        raise SystemExit(f"{src}: vision_feature_select_strategy {cfg['vision_feature_select_strategy']!r}; "
                         f"only 'patch' (drop the first token) is supported")
    text = transformers.AutoConfig.for_model(**cfg["text_config"])
    vision = transformers.AutoConfig.for_model(**cfg["vision_config"])
    tok = transformers.AutoTokenizer.from_pretrained(src)
    if "<|endoftext|>" not in tok.get_vocab():
        raise SystemExit(f"{src}: its tokenizer has no <|endoftext|>; only the phi / qwen2_base prompt is supported")
    if "<image>" not in tok.get_vocab():  # a real vocabulary entry, not TinyLLaVA's -200 placeholder
        tok.add_tokens(["<image>"], special_tokens=True)
    state = map_keys(read_source(src))
    emb = state["model.language_model.embed_tokens.weight"]
    if len(tok) > emb.shape[0]:  # <image> needs a row: a zero one, since it is always replaced by a feature
        state["model.language_model.embed_tokens.weight"] = torch.cat([emb, emb.new_zeros(len(tok) - emb.shape[0], emb.shape[1])])
        if "lm_head.weight" in state:
            head = state["lm_head.weight"]
            state["lm_head.weight"] = torch.cat([head, head.new_zeros(len(tok) - head.shape[0], head.shape[1])])
        text.vocab_size = len(tok)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=cfg.get("vision_feature_layer", -2), vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=text.tie_word_embeddings)
    model = transformers.LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and text.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"{src}: the converted weights do not fill the LLaVA model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    model.tie_weights()
    proc = transformers.LlavaProcessor(
        image_processor=image_processor(src, cfg.get("image_aspect_ratio", "square"), vision, image_processor_dir),
        tokenizer=tok, patch_size=vision.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=0, image_token="<image>", chat_template=CHAT_TEMPLATE)
    model.config.image_seq_length = (vision.image_size // vision.patch_size) ** 2 - 1  # "patch" drops one
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    model.generation_config = transformers.GenerationConfig(pad_token_id=tok.pad_token_id)
    # the template takes string and typed content; eos = <|endoftext|>, which ends every answer in it
    llava_kd.prepare_chat(proc, model.generation_config, src, end_is_eos=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    stock = transformers.LlavaForConditionalGeneration.from_pretrained(out)  # loads back in stock transformers
    transformers.AutoProcessor.from_pretrained(out)
    return stock


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="TinyLLaVA_Factory checkpoint directory")
    ap.add_argument("out", help="where the stock LLaVA directory is written")
    ap.add_argument("--image_processor", help="the vision tower's directory, when SRC has no preprocessor_config.json")
    a = ap.parse_args()
    transformers.utils.logging.set_verbosity_error()
    convert(a.src, a.out, a.image_processor)
    print(f"{a.out}: LlavaForConditionalGeneration + LlavaProcessor (loads with stock from_pretrained)")


if __name__ == "__main__":
    main()

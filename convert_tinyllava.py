"""TinyLLaVA_Factory checkpoint -> stock transformers LLaVA directory (LlavaForConditionalGeneration
+ LlavaProcessor).

    python convert_tinyllava.py SRC_DIR OUT_DIR [--image_processor DIR] [--template NAME]

The format, as TinyLLaVA_Factory (github.com/TinyLLaVA/TinyLLaVA_Factory) writes it:
- tinyllava/model/modeling_tinyllava.py: a TinyLlavaForConditionalGeneration with three parts,
  `language_model` (a causal LM), `vision_tower._vision_tower` (SiglipVisionModel /
  CLIPVisionModel), `connector._connector` (connector/mlp.py, "mlp2x_gelu": Linear, GELU, Linear).
  Saved whole (model.safetensors, possibly sharded, or pytorch_model.bin), or, after its pretrain
  stage, as language_model/, vision_tower/, connector/ folders each holding its part's own state
  dict (load_model.py).
- vision_tower/base.py: features = hidden_states[vision_feature_layer] (-2), and "patch" drops the
  first token: SigLIP's first patch (729 patches -> 728 tokens), CLIP's CLS (577 -> 576):
  transformers' "default" strategy.
- The tower's own image processor (siglip.py, clip.py): SigLIP resizes to a square and never crops;
  CLIP resizes the shortest edge and centre-crops. PIL resizes (transformers 5 prefers torchvision
  when installed: load the converted processor with AutoProcessor.from_pretrained(OUT,
  backend="pil") for TinyLLaVA's exact pixels there).
- config.json (configuration_tinyllava.py): image_token_index -200 is a placeholder spliced in by
  tokenizer_image_token, never a vocabulary id; image_aspect_ratio "pad" pads to a square in the
  processor's mean colour before resizing (data/image_preprocess.py expand2square). It does not say
  which template trained it.
- data/template/*.py: "pretrain" is "<image>{caption}\n"; the others a fixed system sentence, then
  per turn "USER: <image>\n{question} ASSISTANT: {answer}{end}", end <|endoftext|> (phi,
  qwen2_base), <|im_end|> (qwen2_instruct), </s> (llama) or <eos> (gemma); a generation prompt
  ends on "ASSISTANT:".
Refused, in one line: Phi-2 (its head has a bias), other connectors, towers and select strategies,
anyres images.
"""

import argparse
import json
import os

import torch
import transformers
from safetensors import safe_open

import chat

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
# data/template/*.py: the text that ends an answer, by template name. Each of these is SYSTEM, then
# per turn "USER: {question} ASSISTANT: {answer}{end}"; "pretrain" is "<image>{caption}\n", no
# system text, no question.
TEMPLATES = {
    "phi": "<|endoftext|>",
    "qwen2_base": "<|endoftext|>",
    "qwen2_instruct": "<|im_end|>",
    "llama": "</s>",
    "gemma": "<eos>",
    "pretrain": "\n",
}


def chat_template(name):
    """TinyLLaVA's template `name` as a Jinja chat template (chat.prepare_chat makes it take typed
    content too). As data/template/base.py writes a question that holds <image>: the tag removed,
    the rest stripped, "<image>\n" put first, and the whole stripped again."""
    if name == "pretrain":
        return (
            "{%- for m in messages -%}{%- if m['role'] == 'user' %}{{ '<image>' }}"
            "{%- elif m['role'] == 'assistant' %}{{ m['content'] + '\\n' }}{% endif -%}"
            "{%- endfor -%}"
        )
    return (
        "{%- for m in messages -%}{%- if loop.first %}{{ '"
        + SYSTEM.replace("'", "\\'")
        + " ' }}{% endif -%}"
        "{%- if m['role'] == 'user' %}{%- set q = m['content'] -%}"
        "{%- if '<image>' in q %}{%- set q = ('<image>\\n' + (q.replace('<image>', '') | trim)) | "
        "trim -%}{% endif -%}"
        "{{ 'USER: ' + q + ' ' }}"
        "{%- elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + '"
        + TEMPLATES[name]
        + "' }}{% endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif -%}"
    )


# source prefix -> target prefix (module names of LlavaForConditionalGeneration in transformers 5)
KEY_MAP = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    (
        "vision_tower._vision_tower.vision_model.",
        "model.vision_tower.",
    ),  # transformers 4's names, as saved
    ("vision_tower._vision_tower.", "model.vision_tower."),
    ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
    ("connector._connector.2.", "model.multi_modal_projector.linear_2."),
]
PARTS = {
    "language_model": "language_model.",
    "vision_tower": "vision_tower._vision_tower.",
    "connector": "connector.",
}


def read_weights(folder):
    """The state dict in a folder: model.safetensors (or its shards, by the index) or
    pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index) or os.path.isfile(os.path.join(folder, "model.safetensors")):
        names = (
            sorted(set(json.load(open(index))["weight_map"].values()))
            if os.path.isfile(index)
            else ["model.safetensors"]
        )
        state = {}
        for name in names:
            with safe_open(os.path.join(folder, name), "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        return state
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return torch.load(
            os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True
        )
    raise SystemExit(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def read_source(src):
    """The whole model's state dict with TinyLLaVA's key names, from either layout."""
    if all(
        os.path.isdir(os.path.join(src, part)) for part in PARTS
    ):  # the pretrain stage's split folders
        return {
            prefix + k: v
            for part, prefix in PARTS.items()
            for k, v in read_weights(os.path.join(src, part)).items()
        }
    return read_weights(src)


def map_keys(state):
    """TinyLLaVA names -> LLaVA names; stops naming every key that maps to nothing."""
    out, unmapped = {}, []
    for k, v in state.items():
        src = next((s for s, _ in KEY_MAP if k.startswith(s)), None)
        if src is None:
            unmapped.append(k)
        else:
            out[dict(KEY_MAP)[src] + k[len(src) :]] = v
    if unmapped:
        raise SystemExit(
            f"{len(unmapped)} source keys map to no LLaVA key (is this a TinyLLaVA mlp2x_gelu "
            f"checkpoint?): {unmapped[:10]}"
        )
    return out


def image_processor(src, aspect, vision, path=None):
    """The tower's image processor (SRC's own, --image_processor, or SigLIP's standard one) as
    TinyLLaVA applies it: pad to a square in the mean colour first when the source trained with
    image_aspect_ratio "pad", and crop only where the tower's own processor crops (CLIP's does;
    SigLIP's has no crop, so none)."""
    where = path or (src if os.path.isfile(os.path.join(src, "preprocessor_config.json")) else None)
    if where:
        d = transformers.AutoImageProcessor.from_pretrained(where).to_dict()
        kw = {
            k: d[k]
            for k in ("size", "image_mean", "image_std", "resample", "crop_size", "rescale_factor")
            if d.get(k)
        }
        # absent (SigLIP) is no crop, not LLaVA's 224 default
        kw["do_center_crop"] = bool(d.get("do_center_crop"))
    elif vision.model_type in ("siglip_vision_model", "siglip"):  # SigLIP: resize, [-1, 1]
        side = vision.image_size
        kw = dict(
            size={"height": side, "width": side},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            resample=3,
            do_center_crop=False,
        )
    else:
        raise SystemExit(
            f"{src}: no preprocessor_config.json; give the vision tower's with "
            f"--image_processor DIR"
        )
    if aspect not in ("square", "pad"):
        raise SystemExit(
            f"{src}: image_aspect_ratio {aspect!r} cannot be expressed by a LLaVA processor "
            f"(only 'square' and 'pad')"
        )
    # PIL's resize, as TinyLLaVA's
    return transformers.LlavaImageProcessorPil(do_pad=aspect == "pad", **kw)


def refuse(src, cfg, state, tok, template):
    """One line naming what a stock LLaVA cannot express, before anything is written."""
    if cfg.get("model_type") != "tinyllava":
        return f"model_type is {cfg.get('model_type')!r}, not 'tinyllava'"
    if cfg.get("connector_type") != "mlp2x_gelu":
        return f"connector_type {cfg.get('connector_type')!r}: only mlp2x_gelu is LLaVA's projector"
    if cfg.get("vision_feature_select_strategy", "patch") != "patch":
        strategy = cfg["vision_feature_select_strategy"]
        return f"vision_feature_select_strategy {strategy!r}: only 'patch' is supported"
    tower = cfg["vision_config"].get("model_type")
    if tower not in ("siglip_vision_model", "clip_vision_model"):
        return f"vision tower {tower!r}: only SigLIP and CLIP towers are supported"
    if any(k.startswith("language_model.lm_head.bias") for k in state):
        return (
            "its LLM's head has a bias (lm_head.bias: Phi-2), which a stock "
            "LlavaForConditionalGeneration cannot hold"
        )
    end = TEMPLATES[template]
    if template != "pretrain" and end not in tok.get_vocab():
        return (
            f"--template {template} ends answers on {end}, which its tokenizer does not have: "
            f"give the template it was trained with"
        )
    return None


def convert(src, out, image_processor_dir=None, template=None):
    """TinyLLaVA's checkpoint src as an HF LLaVA in out, returned as stock transformers loads it."""
    cfg = json.load(open(os.path.join(src, "config.json")))
    split = all(os.path.isdir(os.path.join(src, part)) for part in PARTS)  # pretrain's folders
    template = template or ("pretrain" if split else "phi")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    source = read_source(src)
    problem = refuse(src, cfg, source, tok, template)
    if problem:
        raise SystemExit(f"{src}: {problem}")
    print(f"{src}: template {template}")
    text = transformers.AutoConfig.for_model(**cfg["text_config"])
    vision = transformers.AutoConfig.for_model(**cfg["vision_config"])
    state = map_keys(source)
    emb = with_image_token(tok, state, text)
    # every part in the source's own dtype (not the config's: a float32 source stays float32)
    tower_dtype = next(v.dtype for k, v in state.items() if k.startswith("model.vision_tower."))
    text.dtype, vision.dtype = emb.dtype, tower_dtype
    clip = vision.model_type == "clip_vision_model"  # "patch" drops its CLS: n^2 patches stay
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=cfg.get("vision_feature_layer", -2),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
    )
    model = transformers.LlavaForConditionalGeneration(config)
    # the source's tensors, as they are
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and text.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(
            f"{src}: the converted weights do not fill the LLaVA model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    model.tie_weights()
    proc = transformers.LlavaProcessor(
        image_processor=image_processor(
            src, cfg.get("image_aspect_ratio", "square"), vision, image_processor_dir
        ),
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=int(clip),
        image_token="<image>",
        chat_template=chat_template(template),
    )
    model.config.image_seq_length = (vision.image_size // vision.patch_size) ** 2 - 1 + int(clip)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config = transformers.GenerationConfig(pad_token_id=tok.pad_token_id)
    # the template takes string and typed content; the token that ends its answers becomes eos
    # (pretrain: "\n")
    chat.prepare_chat(proc, model.generation_config, src, end_is_eos=template != "pretrain")
    if template == "pretrain":
        newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
        model.generation_config.eos_token_id = [newline, tok.eos_token_id]
    return save(model, proc, out)


def with_image_token(tok, state, text):
    """<image> a real vocabulary entry (not TinyLLaVA's -200 placeholder), with a zero row in the
    embeddings and the head (it is always replaced by a feature); returns the embeddings."""
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    emb = state["model.language_model.embed_tokens.weight"]
    if len(tok) > emb.shape[0]:
        for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if k in state:
                rows = state[k].new_zeros(len(tok) - emb.shape[0], emb.shape[1])
                state[k] = torch.cat([state[k], rows])
        text.vocab_size = len(tok)
    return emb


def save(model, proc, out):
    """The model and processor in out, loaded again by stock transformers (returned). The config
    records the widest dtype of the parts (save_pretrained records the first part's, and
    dtype="auto" loads the whole model in it): a mixed source (a bf16 LLM, a float32 tower) then
    loads without rounding any part."""
    model.save_pretrained(out)
    proc.save_pretrained(out)
    saved = json.load(open(os.path.join(out, "config.json")))
    widest = max((p.dtype for p in model.parameters()), key=lambda d: torch.finfo(d).bits)
    saved["dtype"] = str(widest).split(".")[1]
    json.dump(saved, open(os.path.join(out, "config.json"), "w"), indent=2)
    stock = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype="auto")
    transformers.AutoProcessor.from_pretrained(out)
    return stock


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("src", help="TinyLLaVA_Factory checkpoint directory")
    ap.add_argument("out", help="where the stock LLaVA directory is written")
    ap.add_argument(
        "--image_processor",
        help="the vision tower's directory, when SRC has no preprocessor_config.json",
    )
    ap.add_argument(
        "--template",
        choices=list(TEMPLATES),
        help="the TinyLLaVA template SRC was trained with (its "
        "config does not say; default: pretrain for split folders, else phi = qwen2_base)",
    )
    a = ap.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    convert(a.src, a.out, a.image_processor, a.template)
    print(
        f"{a.out}: LlavaForConditionalGeneration + LlavaProcessor (loads with stock "
        f"from_pretrained)"
    )


if __name__ == "__main__":
    main()

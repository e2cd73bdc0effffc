"""Real checkpoint families, built locally at tiny width with their real config fields (nothing
downloaded): llava-hf's Qwen LLaVAs (llava-interleave-qwen-7b-hf / -0.5b-hf), a Qwen1.5-0.5B base
LLM, LLaVA-1.5."""

import json
import os
import subprocess
import sys

import pytest
import safetensors
import torch
import transformers
from conftest import ROOT, args, logits

import chat
import checkpoints
import data
import llava_kd
import memory
import models
from toy import real_ids_tokenizer

# llava-interleave-qwen-*-hf's chat_template.json: typed content only (a string's text renders as
# nothing)
INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images "
    "first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ "
    "'<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen1.5 base tokenizers' template: string content only, a default system turn
QWEN15_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% "
    "endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Vicuna v1, as lmms-eval's llava_hf falls back to for LLaVA-1.5: string content, eos after every
# answer
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an "
    "artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
    "user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ "
    "message['content'] }} {% else %}"
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llm(cls, cfg_cls, vocab, tied, tok, **kw):
    cfg = cfg_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )
    return cls(cfg)


def save_llava(out, vision_cfg, llm, tok, image_processor, template, layer, strategy, extra_tokens):
    cfg = transformers.LlavaConfig(
        vision_config=vision_cfg,
        text_config=llm.config,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    model = transformers.LlavaForConditionalGeneration(cfg)
    proc = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        image_token="<image>",
        chat_template=template,
    )
    model.config.image_seq_length = llava_kd.data.image_seq_length(proc)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def real(toy, tmp_path_factory):
    """Directories shaped like the real checkpoints, filled with random tiny weights."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("real")
    texts = [
        c["value"] for r in json.load(open(f"{toy}/data/sft.json")) for c in r["conversations"]
    ]
    # ids 151643, 151644, 151645, as in Qwen1.5
    qwen = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    # 26 of 27 layers: -1
    siglip = transformers.SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    sig_proc = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    d = {}
    # llava-hf/llava-interleave-qwen-7b-hf and -0.5b-hf: <image> 151646, text vocabulary 152000, eos
    # <|im_end|>
    tok = real_ids_tokenizer(
        texts, 151643, qwen, ["<image>"], eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    for name, tied in (("interleave-7b", False), ("interleave-0.5b", True)):
        llm = tiny_llm(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, 152000, tied, tok)
        d[name] = save_llava(
            root / name, siglip, llm, tok, sig_proc, INTERLEAVE_TEMPLATE, -1, "full", 0
        )
    # Qwen/Qwen1.5-0.5B: vocabulary 151936, tied embeddings, eos <|endoftext|>, no <image> yet
    tok = real_ids_tokenizer(
        texts,
        151643,
        qwen,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN15_TEMPLATE,
    )
    llm = tiny_llm(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, 151936, True, tok)
    llm.save_pretrained(root / "qwen1.5-0.5b")
    tok.save_pretrained(root / "qwen1.5-0.5b")
    d["qwen1.5-0.5b"] = root / "qwen1.5-0.5b"
    # llava-hf/llava-1.5-7b-hf: CLIP with CLS, "default", layer -2, Llama tokenizer, <image> 32000,
    # vocabulary 32064
    llama = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    base = real_ids_tokenizer(
        texts, 32000, [], first=["<unk>", "<s>", "</s>"], chat_template=VICUNA_TEMPLATE, **llama
    )
    tok = real_ids_tokenizer(
        texts,
        32000,
        [],
        ["<image>", "<pad>"],
        first=["<unk>", "<s>", "</s>"],
        pad_token="<pad>",
        **llama,
    )
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>"]) == [0, 1, 2, 32000]
    clip = transformers.CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    clip_proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    llm = tiny_llm(transformers.LlamaForCausalLM, transformers.LlamaConfig, 32064, False, tok)
    d["llava-1.5"] = save_llava(
        root / "llava-1.5", clip, llm, tok, clip_proc, VICUNA_TEMPLATE, -2, "default", 1
    )
    # a Llama-family student LLM with the same tokenizer, before <image> and <pad> were added
    llm = tiny_llm(transformers.LlamaForCausalLM, transformers.LlamaConfig, 32000, False, base)
    llm.save_pretrained(root / "llama")
    base.save_pretrained(root / "llama")
    d["llama"] = root / "llama"
    return {k: str(v) for k, v in d.items()}


def test_fixture_shapes(real):
    for name, image_id, vocab in (("interleave-7b", 151646, 152000), ("llava-1.5", 32000, 32064)):
        cfg = transformers.AutoConfig.from_pretrained(real[name])
        assert (cfg.image_token_id, cfg.text_config.vocab_size) == (image_id, vocab)
    tok = transformers.AutoTokenizer.from_pretrained(real["qwen1.5-0.5b"])
    assert (
        tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]) == [151643, 151645]
        and "<image>" not in tok.get_vocab()
    )


def run(toy, stage, out, *extra):
    one_step = ["--global_batch_size", "2", "--batch_size", "2", "--max_steps", "1"]
    llava_kd.main(args(toy, stage, out, *one_step, "--max_length", "400", *map(str, extra)))
    return [json.loads(line) for line in open(out / "log.jsonl")]


TYPED = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}],
    }
]


def test_qwen15_student_of_an_interleave_teacher_runs_every_stage_in_the_teachers_format(
    toy, real, tmp_path
):
    # vocabulary 152000; the student's is 151936: compared over the shared 151936
    T = real["interleave-7b"]
    logs = {
        "dpt": run(
            toy,
            "dpt",
            tmp_path / "dpt",
            "--vision",
            T,
            "--llm",
            real["qwen1.5-0.5b"],
            "--teacher",
            T,
        ),
        "sft": run(toy, "sft", tmp_path / "sft", "--init", tmp_path / "dpt"),
        "dft": run(toy, "dft", tmp_path / "dft", "--init", tmp_path / "sft", "--teacher", T),
    }
    teacher = transformers.LlavaForConditionalGeneration.from_pretrained(T)
    t_prompt = transformers.AutoProcessor.from_pretrained(T).apply_chat_template(
        TYPED, add_generation_prompt=True
    )
    for stage, log in logs.items():
        assert all(
            r["loss"] == pytest.approx(r["L_reg"] + r["L_res"] + r["L_vis"] + 0.5 * r["L_rel"])
            and (r["L_vis"] > 0) == (stage != "sft")
            for r in log
        )
        model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / stage)
        proc = transformers.AutoProcessor.from_pretrained(tmp_path / stage)
        assert (model.config.text_config.vocab_size, model.config.image_token_id) == (
            151936,
            151646,
        )
        # the prompts the teacher sees are the ones it was trained on: the student took its template
        assert proc.apply_chat_template(TYPED, add_generation_prompt=True) == t_prompt
        for (
            k,
            v,
        ) in (
            teacher.model.vision_tower.state_dict().items()
        ):  # the tower, read from the teacher's files
            assert torch.equal(v, model.model.vision_tower.state_dict()[k]), k
    assert proc.tokenizer.eos_token == "<|im_end|>"  # the chat stages' answers end on it


def test_existing_small_llava_gets_dft_only_through_train_sh(toy, real, tmp_path):
    """README: `INIT=DIR TEACHER=DIR SFT_DATA=... SFT_IMAGES=... bash train.sh` distils an existing
    small HF LLaVA (typed-only template, vocabulary 152000)."""
    env = dict(
        os.environ,
        INIT=real["interleave-0.5b"],
        TEACHER=real["interleave-7b"],
        SFT_DATA=f"{toy}/data/sft.json",
        SFT_IMAGES=f"{toy}/data/images",
        OUT=str(tmp_path),
        NGPU="1",
        BATCH="2",
        EXTRA="--global_batch_size 2 --max_steps 1 --max_length 400 --workers 0",
        PYTHON=sys.executable,  # train.sh runs the Python that runs the tests
    )
    out = subprocess.run(
        ["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "student-dft" / "log.jsonl")]
    assert len(log) == 1 and all(r["L_reg"] > 0 and r["L_res"] > 0 and r["L_vis"] > 0 for r in log)
    _, proc = models.load_llava(tmp_path / "student-dft")
    ds = llava_kd.data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=400
    )
    text = proc.tokenizer.decode(ds[0]["input_ids"])
    # the question's text was rendered
    assert ds.rows[0][2][0]["value"].replace("<image>\n", "") in text


def test_llava15_teacher_teaches_its_own_family_and_refuses_a_qwen_student(toy, real, tmp_path):
    # CLIP with CLS, "default", layer -2: 16 patches + CLS - CLS = 16 visual tokens
    T = real["llava-1.5"]
    run(toy, "dpt", tmp_path / "dpt", "--vision", T, "--llm", real["llama"], "--teacher", T)
    log = run(toy, "dft", tmp_path / "dft", "--init", tmp_path / "dpt", "--teacher", T)
    assert all(r["L_res"] > 0 and r["L_vis"] > 0 for r in log)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "dft")
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (
        -2,
        "default",
        16,
    )
    with pytest.raises(
        SystemExit, match=f"teacher tokenizer {T}.*student tokenizer {real['qwen1.5-0.5b']}"
    ):
        run(
            toy,
            "dpt",
            tmp_path / "qwen",
            "--vision",
            T,
            "--llm",
            real["qwen1.5-0.5b"],
            "--teacher",
            T,
        )


def test_different_chat_formats_are_named_at_start(toy, real, tmp_path, capsys):
    # Qwen1.5's system turn
    model, proc = models.build_student(real["interleave-7b"], real["qwen1.5-0.5b"])
    checkpoints.save_checkpoint_files(model, proc, tmp_path / "student")
    run(
        toy,
        "dft",
        tmp_path / "dft",
        "--init",
        tmp_path / "student",
        "--teacher",
        real["interleave-7b"],
    )
    out = capsys.readouterr().out
    # after the shared '<|im_start|>'
    assert (
        "chat templates render a conversation differently from character 12: student 'system\\nYou "
        "are a "
        "helpful assistant."
        in out
        and "teacher 'user\\n<image>" in out
    )


# llava-hf/llava-1.5-7b-hf's own template: typed content, and nothing after an assistant answer
LLAVA15_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + "
    "': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ "
    "'<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in "
    "message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% "
    "endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_template_with_no_end_of_answer_token_is_refused_for_the_chat_stages(real):
    _, proc = models.load_llava(real["llava-1.5"])
    proc.chat_template = proc.tokenizer.chat_template = LLAVA15_HF_TEMPLATE
    # pt/dpt: fine, both forms
    chat.prepare_chat(proc, transformers.GenerationConfig(), "llava-1.5-hf")
    assert (
        proc.apply_chat_template([{"role": "user", "content": "<image>\nQ?"}], tokenize=False)
        == "USER: <image>\nQ? "
    )
    with pytest.raises(
        ValueError, match="llava-1.5-hf: its chat template ends an assistant turn without a special"
    ):
        chat.prepare_chat(proc, transformers.GenerationConfig(), "llava-1.5-hf", end_is_eos=True)


def test_vision_features_give_the_stock_forward_for_a_clip_default_tower(real):
    """LLaVA-1.5's CLIP tower with the "default" strategy (its CLS token dropped): the forward from
    vision_features gives the stock model's logits, pixel_values in."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(real["llava-1.5"])
    proc = transformers.AutoProcessor.from_pretrained(real["llava-1.5"])
    n = data.image_seq_length(proc)
    ids = torch.tensor([[1] + [model.config.image_token_id] * n + [5, 6, 7]])
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = logits(model, ids, mask, llava_kd.vision_features(model, pixels))
        stock = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(ours, stock)


def test_frozen_weights_are_held_in_bf16_on_cuda_alone_and_saved_as_their_float32(ckpts, tmp_path):
    """The choice, made here on a CPU: nothing without CUDA; with it exactly the frozen Linear and
    Conv2d weights that bf16 holds exactly (not a trained one, not one bf16 would round, not the
    head tied to the embeddings). The logits under bf16 autocast are the same; a checkpoint keeps
    the float32 values and says float32."""
    model, processor = models.load_llava(ckpts / "student", torch.float32)
    llava_kd.apply_stage(model, "pt")  # the projector trains; the LLM and the tower are frozen
    llm = model.model.language_model
    with torch.no_grad():  # a bf16 checkpoint's values, but one frozen weight's
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        llm.layers[0].mlp.up_proj.weight.add_(1e-3)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logits(model, ids, torch.ones_like(ids), None)
    values = {n: p.clone() for n, p in model.named_parameters()}
    memory.hold_frozen_in_bf16(model, cuda=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    memory.hold_frozen_in_bf16(model, cuda=True)
    held = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    modules = dict(model.named_modules())
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in held
    assert any(n.startswith("model.vision_tower.") for n in held)
    for n in held:
        assert isinstance(modules[n.removesuffix(".weight")], (torch.nn.Linear, torch.nn.Conv2d))
    assert not any(n.startswith("model.multi_modal_projector.") for n in held)  # trained
    assert "model.language_model.layers.0.mlp.up_proj.weight" not in held  # bf16 would round it
    assert model.lm_head.weight.dtype == llm.embed_tokens.weight.dtype == torch.float32  # tied
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model, ids, torch.ones_like(ids), None)
    assert torch.equal(got, want)
    checkpoints.save_checkpoint_files(model, processor, tmp_path / "saved")
    with safetensors.safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    saved = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert saved.config.dtype == torch.float32
    for n, p in saved.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, values[n]), n

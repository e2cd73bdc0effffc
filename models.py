"""The student and the teacher from their checkpoints: a new student built from a vision tower and
an LLM, any HF LLaVA loaded, and the checks that the two can be distilled (one vision tower where
they can share it)."""

import json
import os

import torch
import transformers

import chat
import data
import errors
import evaluation


def from_pretrained_checked(cls, path, attn="sdpa", **kwargs):
    """cls.from_pretrained(path) with attention attn, or an error naming what did not load."""
    model, info = cls.from_pretrained(
        path, output_loading_info=True, attn_implementation=attn, **kwargs
    )
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise RuntimeError(f"{path}: weights did not load as expected: {bad}")
    return model


def tower_from_llava(path, cfg, attn="sdpa"):
    """The vision tower of a LLaVA checkpoint in float32, reading only its tensors (the LLM stays on
    disk)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    config = cfg.vision_config
    tower = transformers.AutoModel.from_config(
        config, dtype=torch.float32, attn_implementation=attn
    )
    state = {}
    # saved as "vision_tower.*" (transformers' older names, still written) or "model.vision_tower.*"
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            for key in f.keys():
                for prefix in ("vision_tower.", "model.vision_tower."):
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = f.get_tensor(key)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: the vision tower's weights did not load: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return tower


# What makes two vision towers one shape (their configs)
TOWER_SHAPE = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")
TOWER_SHAPE += ("num_attention_heads", "image_size", "patch_size", "num_channels")


def check_teacher(student, teacher, s_proc, vision, teacher_path):
    """Before any weight is read (meta models; processors from their files): a new student's tower
    (--vision) has the teacher's shape; a student from a checkpoint (its processor s_proc) reads
    the teacher's token ids, image token, visual features and visual tokens an image."""
    if s_proc is None:
        check_tower_shape(student, teacher, vision, teacher_path)
        return
    t_proc = transformers.AutoProcessor.from_pretrained(teacher_path)
    check_compatible(teacher, t_proc, student, s_proc)


def check_tower_shape(student, teacher, vision, teacher_path):
    """Before any weight loads (meta models): a new student's tower (--vision) has the shape of the
    teacher's, which it takes (share_tower): its new projector is made for that width."""
    s, t = student.config.vision_config, teacher.config.vision_config
    differ = [k for k in TOWER_SHAPE if getattr(s, k, None) != getattr(t, k, None)]
    if differ:
        what = ", ".join(
            f"{k} {getattr(s, k, None)} (teacher {getattr(t, k, None)})" for k in differ
        )
        raise errors.UserError(
            f"--teacher {teacher_path}: its vision tower is not the shape of --vision {vision}'s: "
            f"{what}; a new student takes the teacher's tower: --vision {teacher_path}"
        )


def share_tower(student, teacher, teacher_path, new_student):
    """One vision tower for both where it can be (one copy in memory, one forward a batch: the
    paper's shared visual encoder): the teacher's, when it has the student's weights (equal in bf16:
    a tower stored in another precision is the same tower), or for a new student, whose projector
    has learnt nothing yet. An existing student with another tower keeps it, since its projector
    learnt on it: then each model reads the images with its own. Either change is said in a note."""
    s = student.model.vision_tower.state_dict()
    t = teacher.model.vision_tower.state_dict()
    differ = [k for k in t if not torch.equal(s[k].bfloat16(), t[k].bfloat16())]
    tensors = f"{len(differ)} of {len(t)} tensors differ from the teacher's ({teacher_path})"
    if differ and not new_student:
        errors.note(
            f"note: the student keeps its own vision tower ({tensors}; its projector learnt on "
            f"it): each model reads the images with its own tower, a second forward a batch"
        )
        return
    if differ:
        errors.note(
            f"note: the new student takes the teacher's vision tower ({tensors} in --vision)"
        )
    student.model.vision_tower = teacher.model.vision_tower


def check_compatible(teacher, t_proc, student, s_proc):
    """Distillation compares the two models token by token: same token ids, same image token, same
    number of visual tokens an image. Stops with a clear message otherwise."""
    vs, vt = s_proc.tokenizer.get_vocab(), t_proc.tokenizer.get_vocab()
    small, big = sorted((vs, vt), key=len)
    differ = [k for k, i in small.items() if big.get(k) != i]
    problems = []
    if differ:

        def name(p):
            tok = p.tokenizer
            return f"{tok.name_or_path} ({type(tok).__name__}, {len(tok)} tokens)"

        problems.append(
            f"the tokenizers disagree on {len(differ)} tokens (e.g. {differ[:3]}): teacher "
            f"tokenizer {name(t_proc)}, student tokenizer {name(s_proc)}; use a student LLM of "
            f"the teacher's family, with the same tokenizer"
        )
    if teacher.config.image_token_id != student.config.image_token_id:
        problems.append(
            f"image token ids differ: teacher {teacher.config.image_token_id}, "
            f"student {student.config.image_token_id}"
        )
    features = ("vision_feature_layer", "vision_feature_select_strategy")
    t_features, s_features = ([getattr(m.config, k) for k in features] for m in (teacher, student))
    if t_features != s_features:
        problems.append(
            f"the visual features differ (layer, selection): teacher {t_features}, student "
            f"{s_features}; the two share one tower's"
        )
    nt, ns = data.image_seq_length(t_proc), data.image_seq_length(s_proc)
    if nt != ns:
        problems.append(
            f"visual tokens per image differ: teacher {nt}, student {ns} (use the teacher's vision "
            f"tower for the student: --vision TEACHER_DIR)"
        )
    if problems:
        raise errors.UserError(
            "teacher and student cannot be distilled:\n  " + "\n  ".join(problems)
        )


def note_chat_formats(s_proc, t_proc, path):
    """A note when the two chat templates render a conversation differently."""

    def rendered(p):
        if not p.chat_template:
            return "(no chat template)"
        return chat.render(p.tokenizer, p.chat_template, chat.PROBE["string"])

    s, t = rendered(s_proc), rendered(t_proc)
    if s != t:
        i = next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
        errors.note(
            f"note: the student's and the teacher's ({path}) chat templates render a conversation "
            f"differently from character {i}: student {s[i : i + 60]!r}, teacher "
            f"{t[i : i + 60]!r}. The teacher reads the student's format in dft: it distils best "
            f"when the student uses the teacher's template."
        )


def load_or_refuse(load, path, *args):
    """load(path, ...), or one line naming the checkpoint that did not load (--resume, --init)."""
    try:
        return load(path, *args)
    except errors.UserError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # what a damaged file raises
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise errors.UserError(f"{path}: cannot be loaded ({type(e).__name__}: {first})") from None


def load_vision(path, attn="sdpa"):
    """A SigLIP or CLIP checkpoint, or the vision tower of a LLaVA one -> (tower, image processor,
    vision_feature_layer, vision_feature_select_strategy, extra tokens such as CLS)."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    if cfg.model_type == "llava":
        proc = transformers.AutoProcessor.from_pretrained(path)
        tower = tower_from_llava(path, cfg, attn)
        layer = cfg.vision_feature_layer
        strategy = cfg.vision_feature_select_strategy
        return tower, proc.image_processor, layer, strategy, proc.num_additional_image_tokens
    towers = {
        "siglip": transformers.SiglipVisionModel,
        "siglip_vision_model": transformers.SiglipVisionModel,
        "clip": transformers.CLIPVisionModel,
        "clip_vision_model": transformers.CLIPVisionModel,
    }
    if cfg.model_type not in towers:
        raise errors.UserError(
            f"--vision {path}: a SigLIP, CLIP or LLaVA checkpoint is needed, not {cfg.model_type}"
        )
    tower = from_pretrained_checked(towers[cfg.model_type], path, attn, dtype=torch.float32)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    # CLIP has a CLS token, which LLaVA-1.5 drops ("default"). SigLIP has none: "full" keeps all
    # 27 x 27 = 729 patch tokens at 384 px (the public code drops one).
    clip = towers[cfg.model_type] is transformers.CLIPVisionModel
    strategy = "default" if clip else "full"
    return tower, image_processor, -2, strategy, int(clip)


def build_student(vision_path, llm_path, attn="sdpa"):
    """A new LLaVA from a pretrained vision tower and causal LM, with a new projector; float32."""
    tower, image_processor, layer, strategy, extra = load_vision(vision_path, attn)
    llm = from_pretrained_checked(
        transformers.AutoModelForCausalLM, llm_path, attn, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(llm_path)
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    if tok.pad_token is None:  # Llama has none; padding is known by the attention mask, not its id
        tok.pad_token = tok.unk_token or tok.eos_token
    if len(tok) > llm.config.vocab_size:
        llm.resize_token_embeddings(len(tok))
    config = transformers.LlavaConfig(
        vision_config=tower.config,
        text_config=llm.config,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    with torch.device("meta"):  # a shell: the pretrained parts are put in below
        model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    projector = transformers.models.llava.modeling_llava.LlavaMultiModalProjector(config)
    model.model.multi_modal_projector = projector  # new, initialised from the seed
    model.generation_config = llm.generation_config
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token="<image>",
        num_additional_image_tokens=extra,
        chat_template=tok.chat_template,
    )
    config.image_seq_length = data.image_seq_length(processor)
    chat.prepare_chat(processor, model.generation_config, llm_path)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [name for name, p in tensors if p.is_meta]
    if meta:
        raise RuntimeError(f"student from {vision_path} + {llm_path}: not loaded: {meta[:5]}")
    return model, processor


def load_llava(path, dtype=None, attn="sdpa"):
    """Any LLaVA checkpoint directory in HF format (a teacher, or a previous stage's output)."""
    model = from_pretrained_checked(
        transformers.LlavaForConditionalGeneration, path, attn, dtype=dtype
    )
    processor = transformers.AutoProcessor.from_pretrained(path)
    chat.prepare_chat(processor, model.generation_config, path)
    return model, processor


def load_teacher(path, student, s_proc, dtype=None, new_student=False, attn="sdpa"):
    """The teacher: frozen, in eval mode, checked against the student. The two share one vision
    tower where they can (share_tower; the paper shares the visual encoder). Both read the
    same token ids, so the teacher reads the student's chat format: a new student takes the
    teacher's."""
    teacher, t_proc = load_llava(path, dtype, attn)
    teacher.eval().requires_grad_(False)
    check_compatible(teacher, t_proc, student, s_proc)
    if new_student and t_proc.chat_template:
        s_proc.chat_template = s_proc.tokenizer.chat_template = t_proc.chat_template
        chat.prepare_chat(s_proc, student.generation_config, path)
    note_chat_formats(s_proc, t_proc, path)
    if teacher.model.vision_tower.dtype != torch.float32:  # the tower as stored, not bf16-rounded:
        # the student trains beside it and saves it
        tower = tower_from_llava(path, teacher.config, attn).eval().requires_grad_(False)
        teacher.model.vision_tower = tower
    share_tower(student, teacher, path, new_student)
    return teacher


def load_stage(a, stage, checked, cuda, world, rank):
    """The models and the data sets of a stage (llava_kd.STAGES[a.stage]) that the checks read
    the way to: (model, processor, teacher, data set, the indices of the samples that
    --drop_too_long leaves out on this process, the held-out set or None)."""
    source, left_out = checked.source, checked.left_out
    torch.manual_seed(a.seed)  # the same new projector on every process
    # float32 master weights for AdamW whatever the checkpoint's dtype (bf16 in most published
    # LLaVA and LLM checkpoints: at lr 2e-5 most updates of a bf16 weight round away)
    if source:
        model, processor = load_or_refuse(load_llava, source, torch.float32, a.attn_implementation)
    else:
        model, processor = build_student(a.vision, a.llm, a.attn_implementation)
    teacher = None
    if stage["teacher"]:
        dtype = torch.bfloat16 if cuda else torch.float32
        new = source is None
        attn = a.attn_implementation
        teacher = load_teacher(a.teacher, model, processor, dtype, new, attn)
    chat.prepare_chat(processor, model.generation_config, source or a.llm, stage["chat"])
    ds = data.LlavaDataset(
        data.label(a.data),
        None,  # the samples, read and checked
        processor,
        chat=stage["chat"],
        max_length=a.max_length,
        samples=checked.samples,
    )
    if source is None:  # a new student: checked with its processor, built with its weights
        left_out = ds.check_lengths(rank, world, a.drop_too_long)
    held_out = evaluation.held_out_set(a, processor, stage["chat"], checked.held_out, rank, world)
    return model, processor, teacher, ds, left_out, held_out

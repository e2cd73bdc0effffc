"""Chat templates: one template on a processor and its tokenizer that renders both forms of a turn's
content, and the token that ends an assistant turn as the eos of generation."""

import errors

# Chat templates. Clients pass a turn's content as a string ("<image>\nWhat is it?": lmms-eval's
# llava_hf) or typed ([{"type": "image"}, {"type": "text", "text": ...}]: transformers' pipeline,
# VLMEvalKit); LLM tokenizers' templates take only strings, llava-hf's only typed content. Every
# template saved here takes both: one of these preludes rewrites the messages into the form the
# template underneath reads.
TYPED_AS_STRING = (  # image parts first, "<image>\n" each, then the text parts: LLaVA's own layout
    "{%- set ns = namespace(m=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set ns.m = ns.m + [m] -%}"
    "{%- else -%}"
    "{%- set c = namespace(s='') -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}"
    "{%- set c.s = c.s + '<image>\\n' -%}"
    "{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}"
    "{%- set c.s = c.s + p['text'] -%}"
    "{%- endfor -%}"
    "{%- set ns.m = ns.m + [{'role': m['role'], 'content': c.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.m -%}"
)
STRING_AS_TYPED = (  # one image part per "<image>", then the text without them
    "{%- set ns = namespace(m=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set c = namespace(p=[]) -%}"
    "{%- for i in range(m['content'].count('<image>')) -%}"
    "{%- set c.p = c.p + [{'type': 'image'}] -%}"
    "{%- endfor -%}"
    "{%- set c.p = c.p + [{'type': 'text', "
    "'text': m['content'].replace('<image>\\n', '').replace('<image>', '')}] -%}"
    "{%- set ns.m = ns.m + [{'role': m['role'], 'content': c.p}] -%}"
    "{%- else -%}"
    "{%- set ns.m = ns.m + [m] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.m -%}"
)
PROBE = {
    "string": [
        {"role": "user", "content": "<image>\nQUESTION"},
        {"role": "assistant", "content": "ANSWER"},
    ],
    "typed": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "QUESTION"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ANSWER"}]},
    ],
}


def render(tok, template, messages, generation_prompt=False):
    return tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_template_both_forms(tok, template, where):
    """template, or template behind a prelude that renders string and typed content alike."""

    def renders(t, form):
        try:
            text = render(tok, t, PROBE[form])
        except Exception:  # a template written for the other form may fail on this one
            return None
        return text if "<image>" in text and "ANSWER" in text else None

    for t in (template, TYPED_AS_STRING + template, STRING_AS_TYPED + template):
        if renders(t, "string") is not None and renders(t, "string") == renders(t, "typed"):
            return t
    raise errors.UserError(
        f"{where}: its chat template renders neither string nor typed content as a LLaVA prompt "
        f"(<image>, then the question); give it one that does"
    )


def prepare_chat(processor, generation_config, where, end_is_eos=False):
    """One chat template on processor and tokenizer alike, taking both content forms; the token that
    ends an assistant turn in it (<|im_end|> in ChatML) becomes the generation config's first eos id
    and, for the chat stages (end_is_eos), the tokenizer's eos: a client that stops on
    tokenizer.eos_token_id (lmms-eval) then stops where training ended every answer. Qwen's chat
    models ship so (eos <|im_end|>); a base LLM's tokenizer says <|endoftext|>, which ChatML never
    emits after an answer. pt/dpt keep it: captions end on <|endoftext|>."""
    tok = processor.tokenizer
    template = processor.chat_template or tok.chat_template
    if template is None:  # allowed for pt/dpt; LlavaDataset stops sft/dft on it
        return
    template = chat_template_both_forms(tok, template, where)
    processor.chat_template = tok.chat_template = template
    text = render(tok, template, PROBE["string"])
    answer_end = text[text.rindex("ANSWER") + len("ANSWER") :]
    after = tok(answer_end, add_special_tokens=False)["input_ids"][:1]  # the token ending a turn
    added_special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    special = set(tok.all_special_ids) | added_special
    if not (after and after[0] in special):
        if end_is_eos:
            raise errors.UserError(
                f"{where}: its chat template ends an assistant turn without a special token, so no "
                f"generation could stop there; use a template that ends turns with one (eos, "
                f"<|im_end|>)"
            )
        return
    if end_is_eos:
        tok.eos_token = tok.convert_ids_to_tokens(after[0])
    old = generation_config.eos_token_id
    old = [] if old is None else [old] if isinstance(old, int) else list(old)
    generation_config.eos_token_id = after + [i for i in dict.fromkeys(old) if i != after[0]]
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tok.pad_token_id

"""LLaVA-format data -> input_ids, labels, pixel_values; the collate.

A LLaVA JSON file is a list of {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"},
...]}; "image" is a path relative to the image folder and "<image>" marks where it goes in the first
human turn.
"""

import hashlib
import json
import os

import torch
from PIL import Image

IGNORE = -100  # label of every position that is not an answer token: no loss is taken there


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, the data): its message alone, no traceback."""


NOTES = []  # this process's (text, sample ids): runtime.print_notes prints each once a run


def note(text, ids=()):
    """{n} in text: the count of every process's ids (each checks a share); {ids}: five of them."""
    NOTES.append((text, list(ids)))


class DataError(UserError):
    pass


def image_seq_length(processor):
    """Visual tokens per image: what LlavaProcessor expands <image> to (patches, + CLS, - 1 for
    "default")."""
    image = Image.new("RGB", (8, 8))
    h, w = processor.image_processor(image, return_tensors="pt")["pixel_values"].shape[-2:]
    p = processor.patch_size
    n = (h // p) * (w // p) + processor.num_additional_image_tokens
    return n - (processor.vision_feature_select_strategy == "default")


def read_samples(json_path, image_folder, rank=0, world=1):
    """Every sample of a LLaVA JSON file, checked: [(id, image path or None, turns)]. One DataError
    names the file and lists every bad sample id; a missing or misplaced <image> is put at the start
    of the first turn. Each of `world` processes opens the image headers of its share of samples.
    A JSON list, or JSON Lines (one sample a line); a UTF-8 byte order mark is skipped."""
    try:
        with open(json_path, encoding="utf-8-sig") as f:
            text = f.read()
        try:
            rows = json.loads(text)
        except ValueError:
            if text.lstrip().startswith(("[", "{")) and "\n{" not in text.strip():  # one value
                raise  # with an error in it: say where
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path}: not a readable LLaVA JSON list of samples ({e})") from e
    if not isinstance(rows, list):
        found = f"an object with keys {list(rows)[:8]}" if isinstance(rows, dict) else repr(rows)
        raise DataError(
            f'{json_path}: {found[:200]}, where a JSON list of samples belongs ([{{"id", '
            f'"image", "conversations"}}, ...]; or JSON Lines, one sample a line)'
        )
    samples, problems, moved = [], [], [0]
    for i, row in enumerate(rows):
        try:
            samples.append(_check(row, i, image_folder, moved, i % world == rank))
        except DataError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise DataError(f"{json_path}: {problems[0]}")
    if problems:
        raise DataError(
            f"{json_path}: {len(problems)} bad sample(s), fix or remove them:\n  "
            + "\n  ".join(problems[:20])
            + ("\n  ..." if len(problems) > 20 else "")
        )
    if moved[0] and rank == 0:  # every process counts every sample
        print(
            f"{json_path}: put <image> at the start of the first human turn in {moved[0]} sample(s)"
        )
    return samples


def file_sha256(path):
    """What a data file holds, whatever its path: a checkpoint is continued on the same samples."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check(row, i, image_folder, moved, open_image):
    sid = row.get("id", f"#{i}") if isinstance(row, dict) else f"#{i}"
    conv = row.get("conversations") if isinstance(row, dict) else None
    if not conv:
        raise DataError(f"sample {sid}: empty or missing 'conversations'")
    if len(conv) % 2 or any(
        not isinstance(c, dict)
        or c.get("from") != ("human", "gpt")[j % 2]
        or not isinstance(c.get("value"), str)
        for j, c in enumerate(conv)
    ):
        raise DataError(
            f"sample {sid}: turns must alternate human/gpt, start with human, end with gpt"
        )
    for c in conv:
        try:
            c["value"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"sample {sid}: text that is not valid Unicode ({e.reason})") from None
    if any(not c["value"].strip() for c in conv[1::2]):
        raise DataError(f"sample {sid}: an empty answer (it would train on the end token alone)")
    conv = [dict(c) for c in conv]
    n_tags = sum(c["value"].count("<image>") for c in conv)
    image = row.get("image")
    if image is None:
        if n_tags:
            raise DataError(f"sample {sid}: <image> in the text of a sample with no 'image'")
        return sid, None, conv
    if not isinstance(image, str) or n_tags > 1:
        raise DataError(
            f"sample {sid}: one image per sample is supported ('image' must be one path)"
        )
    path = os.path.join(image_folder, image)
    if open_image and not os.path.isfile(path):
        raise DataError(
            f"sample {sid}: image file {path} not found (is --images the folder the paths "
            f"in the JSON are relative to?)"
        )
    if open_image:
        check_image(path, sid)
    if not conv[0]["value"].startswith("<image>"):  # LLaVA: the image opens the first human turn
        moved[0] += 1
        conv[0]["value"] = (
            "<image>\n" + "".join(c["value"].replace("<image>", "") for c in conv[:1]).strip()
        )
        for c in conv[1:]:  # the tag's turn as if it had never held it
            if "<image>" in c["value"]:
                c["value"] = c["value"].replace("<image>", "").strip()
    return sid, path, conv


def check_image(path, sid):
    """The image's header: its format and size (PIL reads no pixels for it)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"sample {sid}: image file {path} cannot be read ({e})") from None
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise DataError(
            f"sample {sid}: image file {path} has {width * height / 1e6:.0f} megapixels, above "
            f"PIL's limit for untrusted images ({Image.MAX_IMAGE_PIXELS / 1e6:.0f}): resize it"
        )


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
    raise UserError(
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
            raise UserError(
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


class LlavaDataset(torch.utils.data.Dataset):
    """chat=False: the pretraining template  <image tokens> caption <eos>, labels on caption + eos.
    chat=True: the saved processor's chat template, labels on every assistant turn and its
    end-of-turn token. samples: read_samples(json_path, image_folder) when already read (train
    checks the data before loading any weights); otherwise the file is read and checked here."""

    def __init__(self, json_path, image_folder, processor, chat, max_length, samples=None):
        self.json_path = json_path
        self.chat = chat
        self.max_length = max_length
        self.processor, self.tok = processor, processor.tokenizer
        self.image_token, self.image_token_id = processor.image_token, processor.image_token_id
        self.n_image_tokens = image_seq_length(processor)
        self.template = processor.chat_template or self.tok.chat_template
        if chat and not self.template:
            raise DataError(
                f"{json_path}: sft/dft render conversations with the model's chat template, and "
                f"its processor and tokenizer have none"
            )
        self.rows = read_samples(json_path, image_folder) if samples is None else samples

    def __len__(self):
        return len(self.rows)

    def check_lengths(self, rank=0, world=1, drop=False):
        """This process's share tokenized, no image read: a sample with no answer token within
        max_length is refused by id (drop: noted, and its index returned); a cut answer noted."""
        refused, cut, left_out = [], [], []
        for i in range(rank, len(self.rows), world):
            sid, image, conv = self.rows[i]
            ids, labels = self._chat(conv) if self.chat else self._plain(conv, image is not None)
            shift = self.n_image_tokens - 1 if image is not None else 0  # <image> -> n tokens
            answer = [j + shift for j, label in enumerate(labels) if label != IGNORE]
            problem = None
            if not answer:  # a template that marks no answer
                problem = "no answer token at all"
            elif answer[0] >= self.max_length:
                problem = f"needs {answer[0] + 1}"
            elif answer[-1] >= self.max_length:
                cut.append(sid)
            if problem:
                refused.append(f"{sid} ({problem})")
                left_out.append(i)
        where = f"{self.json_path}: {{n}} sample(s) have no answer token within --max_length"
        where += f" {self.max_length}"
        if refused and not drop:
            raise DataError(
                f"{where.replace('{n}', str(len(refused)))}: {', '.join(refused[:10])}"
                f"{' ...' if len(refused) > 10 else ''}; raise --max_length, remove them, or leave "
                f"them out with --drop_too_long"
            )
        if left_out:
            ids = [self.rows[i][0] for i in left_out]
            note(f"note: {where}: left out (--drop_too_long), e.g. {{ids}}", ids)
        if cut:
            limit = f"--max_length {self.max_length} (their end token is not trained)"
            note(f"note: {self.json_path}: {{n}} answer(s) cut short by {limit}, e.g. {{ids}}", cut)
        return left_out

    def _plain(self, conv, has_image):
        caption = self.tok(conv[1]["value"].strip(), add_special_tokens=False)["input_ids"]
        caption = caption + [self.tok.eos_token_id]
        prompt = [self.image_token_id] if has_image else []
        return prompt + caption, [IGNORE] * len(prompt) + caption

    def _chat(self, conv):
        msgs = [
            {"role": ("user", "assistant")[j % 2], "content": c["value"]}
            for j, c in enumerate(conv)
        ]
        text, spans = render(self.tok, self.template, msgs), []
        # the character span of each assistant answer and its end-of-turn token
        for j in range(1, len(msgs), 2):
            start = len(render(self.tok, self.template, msgs[:j], generation_prompt=True))
            upto = render(self.tok, self.template, msgs[: j + 1])
            if not text.startswith(upto):
                raise DataError(
                    "the chat template does not render a conversation's turns as prefixes of it"
                )
            spans.append((start, start + len(upto[start:].rstrip())))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            t if any(s <= a and b <= e for s, e in spans) else IGNORE
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        return enc["input_ids"], labels

    def __getitem__(self, i):
        sid, image, conv = self.rows[i]
        ids, labels = self._chat(conv) if self.chat else self._plain(conv, image is not None)
        pixel_values = None
        # one <image> token -> n_image_tokens of them, never cut by truncation
        if image is not None:
            k, n = ids.index(self.image_token_id), self.n_image_tokens
            if k + n >= self.max_length:
                raise DataError(
                    f"--max_length {self.max_length} leaves no room for text after the {n} image "
                    f"tokens of sample {sid} in {self.json_path}: raise --max_length"
                )
            ids = ids[:k] + [self.image_token_id] * n + ids[k + 1 :]
            labels = labels[:k] + [IGNORE] * n + labels[k + 1 :]
            try:
                with Image.open(image) as im:
                    img = im.convert("RGB")
            except (OSError, Image.DecompressionBombError) as e:  # the header was fine
                error = f"{self.json_path}: sample {sid}: cannot decode image {image} ({e})"
                return {"id": sid, "error": error}  # the loop saves a checkpoint and stops
            processed = self.processor.image_processor(img, return_tensors="pt")
            pixel_values = processed["pixel_values"][0]
        # truncation cuts text from the end
        ids = ids[: self.max_length]
        labels = labels[: self.max_length]
        return {
            "id": sid,
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values,
        }


def collate(rows, pad_token_id):
    """Right padding; attention_mask marks real tokens (Qwen's pad id is also an end token, so
    padding is known by the mask, never by id); pixel_values stacks the images of the rows that have
    one, in order. errors: the rows whose image did not decode (then nothing else)."""
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {"errors": errors}
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.full((B, T), pad_token_id),
        "labels": torch.full((B, T), IGNORE),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
    }
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][b, :n] = r["input_ids"]
        out["labels"][b, :n] = r["labels"]
        out["attention_mask"][b, :n] = 1
    images = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
    out["pixel_values"] = torch.stack(images) if images else None
    out["errors"] = []
    return out

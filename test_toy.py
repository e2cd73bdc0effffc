"""toy.py's diagnostics: the linear probe and `probe`, which the README's account of DFT on the toy quotes."""
import random
import re

import torch

import data
import llava_kd
import toy as toy_module


def test_linear_probe_reads_what_is_linearly_there_and_nothing_else():
    torch.manual_seed(0)
    x = torch.randn(3000, 8)
    x = x[(x[:, 2].abs() > 0.3) & (x[:, 5].abs() > 0.3)][:900]  # a margin between the classes
    y = (x[:, 2] > 0).long() + 2 * (x[:, 5] > 0).long()  # four classes, each a quadrant of two features
    assert toy_module._linear_probe(x, y, 600) > 0.97
    noise = torch.randint(0, 4, (900,))  # labels unrelated to x: held-out accuracy stays near chance (0.25)
    assert toy_module._linear_probe(x, noise, 600) < 0.4


def test_probe_scores_every_answer_token_and_every_visual_position(toy, tmp_path):
    model, proc = llava_kd.build_student(f"{toy}/vision", f"{toy}/student_llm")
    llava_kd.save_checkpoint_files(model, proc, str(tmp_path))
    report = toy_module.probe(str(tmp_path), f"{toy}/data/sft.json", f"{toy}/data/images", n_scenes=30)
    ds = data.LlavaDataset(f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=4096)
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = sum(int(((ds[i]["labels"] != data.IGNORE) & (ds[i]["labels"] != end)).sum()) for i in range(len(ds)))
    assert f"answer tokens ({answers})" in report
    numbers = dict(re.findall(r"(p\(label\)|top-1 = label|colour|shape) (\d\.\d+)", report))
    assert set(numbers) == {"p(label)", "top-1 = label", "colour", "shape"}
    assert all(0 <= float(v) <= 1 for v in numbers.values())
    scenes = [toy_module._toy_scene(random.Random(i)) for i in range(3)]
    lp, labels, visual = toy_module._answer_and_visual_outputs(model.eval(), proc, f"{toy}/data/sft.json",
                                                               f"{toy}/data/images", scenes)
    assert lp.shape == (len(labels), model.config.text_config.vocab_size)
    assert visual.shape[:2] == (3, data.image_seq_length(proc))  # every visual position of every image

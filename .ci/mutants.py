"""A mutation round: each deliberate bug applied alone to a copy of the repository, and the tests
that should see it run against it (-x: the first failure kills it). Not run by CI.

    python .ci/mutants.py [--only NAME ...] [--copy /tmp/mutants]

A mutant is (name, file, the text as it is, the text with the bug, test files). It survives when
those tests pass with the bug in: then a property is unguarded (or the bug is not one, say why).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

LOSS = ["test_losses.py", "tests/test_properties.py"]
DATA = ["tests/test_model_data.py", "tests/test_properties.py", "tests/test_errors.py"]
LOOP = ["tests/test_train.py", "tests/test_properties.py", "tests/test_nothing_lost.py"]
RUNTIME = ["tests/test_nothing_lost.py", "tests/test_plan.py", "tests/test_continue.py"]
RUNTIME += ["tests/test_properties.py"]
SCRIPT = ["tests/test_train_sh.py", "tests/test_properties.py", "tests/test_continue.py"]
SCRIPT += ["tests/test_recipe.py"]

MUTANTS = [
    # the twelve properties of issue 43
    (
        "next_token_loss ignores its count",
        "llava_kd.py",
        "return nll.sum() / (num_rows or rows.sum().clamp_min(1))",
        "return nll.sum() / rows.sum().clamp_min(1)",
        LOSS,
    ),
    (
        "fused_loss accumulates in the input dtype",
        "llava_kd.py",
        "acc_dtype = torch.promote_types(h_s.dtype, torch.float32)",
        "acc_dtype = h_s.dtype",
        LOSS,
    ),
    (
        "every epoch the same order",
        "data.py",
        "sampler.set_epoch(epoch)",
        "sampler.set_epoch(0)",
        LOOP,
    ),
    (
        "FSDP2 reduces in bf16",
        "processes.py",
        "MixedPrecisionPolicy(torch.bfloat16, torch.float32)",
        "MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16)",
        LOOP,
    ),
    (
        "global batch checked against batch size only",
        "flags.py",
        "if global_batch % (a.batch_size * world):",
        "if global_batch % a.batch_size:",
        RUNTIME,
    ),
    (
        "complete.json leaves out train_state.pt",
        "checkpoints.py",
        "for n in sorted(os.listdir(tmp))}",
        'for n in sorted(os.listdir(tmp)) if n != "train_state.pt"}',
        RUNTIME,
    ),
    (
        "SIGUSR1 not taken",
        "signals.py",
        "SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT,",
        "SIGNALS = (signal.SIGTERM, signal.SIGINT,",
        RUNTIME,
    ),
    (
        "AdamW moments 4 bytes",
        "memory.py",
        '("AdamW moments, float32", 8 * trained / shards, "held")',
        '("AdamW moments, float32", 4 * trained / shards, "held")',
        RUNTIME,
    ),
    (
        "converter pads the embeddings only",
        "convert_tinyllava.py",
        'for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):',
        'for k in ("model.language_model.embed_tokens.weight",):',
        ["tests/test_properties.py", "tests/test_convert.py"],
    ),
    (
        "length check shifts by all image tokens",
        "data.py",
        "shift = self.n_image_tokens - 1 if image is not None else 0",
        "shift = self.n_image_tokens if image is not None else 0",
        DATA,
    ),
    (
        "train.sh: dft from dpt, not dpt-sft",
        "train.sh",
        'stage dft $SFT --init "$OUT/student-dpt-sft"',
        'stage dft $SFT --init "$OUT/student-dpt"',
        SCRIPT,
    ),
    (
        "resume takes the first complete checkpoint",
        "checkpoints.py",
        "return max(found)[1] if found else None, problems",
        "return found[0][1] if found else None, problems",
        RUNTIME,
    ),
    # losses
    (
        "KL's arguments swapped",
        "llava_kd.py",
        "F.kl_div(log_p_s, log_p_t.detach(), log_target=True",
        "F.kl_div(log_p_t.detach(), log_p_s, log_target=True",
        LOSS,
    ),
    (
        "L_rel: 1 + cos",
        "llava_kd.py",
        "return 1 - torch.sum(R_s * R_t) / norms.clamp_min(1e-16)",
        "return 1 + torch.sum(R_s * R_t) / norms.clamp_min(1e-16)",
        LOSS,
    ),
    (
        "lean L_rel: dL/dW of W^T W taken once, not twice",
        "llava_kd.py",
        "dL_dM = dL_dM + dL_dM.T",
        "dL_dM = dL_dM",
        LOSS,
    ),
    (
        "prompt rows include the visual rows",
        "llava_kd.py",
        "rows = ~response_rows(labels) & ~visual_mask",
        "rows = ~response_rows(labels)",
        LOSS,
    ),
    (
        "lean path: dL/dh from the wrong head",
        "llava_kd.py",
        "dL_dh.index_add_(0, rows[part], matmul(G, w_gemm, acc_dtype))",
        "dL_dh.index_add_(0, rows[part], matmul(G, w_gemm, acc_dtype) * 0.5)",
        LOSS,
    ),
    # data
    (
        "plain template without eos",
        "data.py",
        "caption = caption + [self.tok.eos_token_id]",
        "caption = caption",
        DATA,
    ),
    (
        "images checked by rank 0 only",
        "data.py",
        "_check(row, i, image_folder, moved, i % world == rank)",
        "_check(row, i, image_folder, moved, i % world == 0)",
        DATA + ["tests/test_train.py"],
    ),
    (
        "truncation one token short",
        "data.py",
        "ids = ids[: self.max_length]",
        "ids = ids[: self.max_length - 1]",
        DATA,
    ),
    (
        "collate pads the labels with the pad id",
        "data.py",
        '"labels": torch.full((B, T), IGNORE),',
        '"labels": torch.full((B, T), pad_token_id),',
        DATA,
    ),
    # the loop
    (
        "counts not divided by the processes",
        "llava_kd.py",
        "return [max(float(c), 1.0) / world for c in count[:4]]",
        "return [max(float(c), 1.0) for c in count[:4]]",
        LOOP,
    ),
    (
        "no checkpoint when a signal stops the run",
        "llava_kd.py",
        "(step + 1) % a.save_every == 0) or stopping:",
        "(step + 1) % a.save_every == 0):",
        LOOP,
    ),
    (
        "warm-up one step longer",
        "llava_kd.py",
        "return peak * (step + 1) / warmup",
        "return peak * step / warmup",
        LOOP,
    ),
    (
        "clip at 10",
        "llava_kd.py",
        'clip_grad_norm_(r.params, r.table["clip"])',
        "clip_grad_norm_(r.params, 10.0)",
        LOOP,
    ),
    # runtime
    (
        "lr may change on resume",
        "checkpoints.py",
        'MAY_CHANGE = {"resume", "max_steps",',
        'MAY_CHANGE = {"lr", "resume", "max_steps",',
        RUNTIME,
    ),
    (
        "resumed log keeps the lines before the step only",
        "checkpoints.py",
        "if step <= start_step:",
        "if step < start_step:",
        RUNTIME,
    ),
    ("a repeated signal stops at once", "signals.py", "REPEAT = 60", "REPEAT = 0", RUNTIME),
    (
        "no fragmentation margin",
        "memory.py",
        "(held + max(forward, step)) * (1.1 if cuda else 1.0)",
        "(held + max(forward, step))",
        RUNTIME,
    ),
    (
        "a finished stage keeps its checkpoint",
        "checkpoints.py",
        "    if finished:\n        for name in CHECKPOINTS:",
        "    if False:\n        for name in CHECKPOINTS:",
        RUNTIME,
    ),
    (
        "auto_resume skips whatever max_steps",
        "checkpoints.py",
        'and done["args"].get("max_steps") == a.max_steps:',
        "and True:",
        RUNTIME,
    ),
    (
        "auto_resume starts a stopped stage again",
        "checkpoints.py",
        '    return "resume" if resumable else "start"\n',
        '    return "start"\n',
        SCRIPT,
    ),
    (
        "--drop_too_long keeps them",
        "data.py",
        "ds.rows = [row for i, row in enumerate(ds.rows) if i not in gone]",
        "ds.rows = list(ds.rows)",
        RUNTIME,
    ),
    # the converter
    (
        "converter counts CLIP's CLS twice",
        "convert_tinyllava.py",
        "** 2 - 1 + int(clip)",
        "** 2 + int(clip)",
        ["tests/test_convert.py"],
    ),
    (
        "converter takes the last layer",
        "convert_tinyllava.py",
        'vision_feature_layer=cfg.get("vision_feature_layer", -2)',
        'vision_feature_layer=cfg.get("vision_feature_layer", -1)',
        ["tests/test_convert.py"],
    ),
    # train.sh and the toy
    (
        "train.sh: dft under DDP",
        "train.sh",
        "[[ $1 == sft || $1 == dft ]]",
        "[[ $1 == sft ]]",
        SCRIPT,
    ),
    (
        "train.sh passes no SIGUSR1",
        "train.sh",
        'for s in TERM INT HUP QUIT USR1; do trap "kill',
        'for s in TERM INT HUP QUIT; do trap "kill',
        SCRIPT + ["tests/test_nothing_lost.py"],
    ),
    (
        "toy: PT-SFT-DFT from PT",
        "train.sh",
        "stage dft $SFT --seed $1 --init $OUT/seed$1/pt-sft ",
        "stage dft $SFT --seed $1 --init $OUT/seed$1/pt ",
        SCRIPT,
    ),
    (
        "toy table: population sd",
        "toy.py",
        "/ max(len(xs) - 1, 1)) ** 0.5",
        "/ max(len(xs), 1)) ** 0.5",
        ["tests/test_toy.py"],
    ),
    (
        "toy prior: the least frequent answer",
        "toy.py",
        "best = {q: c.most_common(1)[0][0] for q, c in answers.items()}",
        "best = {q: c.most_common()[-1][0] for q, c in answers.items()}",
        ["tests/test_toy.py", "tests/test_recipe.py"],
    ),
    # round 3 (issue 44): the lean block's gradients, CUDA's GEMMs, W_s^T W_s once a step
    ("lean block: phi_s without the KL's weight", "llava_kd.py", "c = a + b\n", "c = a\n", LOSS),
    (
        "lean block: the one-hot added, not taken",
        "llava_kd.py",
        "minus_q.scatter_add_(1, target[:, None].clamp_min(0), -a)",
        "minus_q.scatter_add_(1, target[:, None].clamp_min(0), a)",
        LOSS,
    ),
    (
        "lean block: KL against the whole student vocabulary",
        "llava_kd.py",
        "kl = rowdot(p_t, log_p_t) - rowdot(p_t, log_p_sv)",
        "kl = rowdot(p_t, log_p_t) - rowdot(p_t, log_p_s[:, : len(w_t)])",
        LOSS,
    ),
    (
        "lean block: phi_s' not renormalised",
        "llava_kd.py",
        "log_p_sv = log_p_s if v == V else log_probs(log_p_s[:, :v])",
        "log_p_sv = log_p_s[:, :v]",
        LOSS,
    ),
    (
        "lean block: a larger student's c keeps b",
        "llava_kd.py",
        "p_t, c = F.pad(p_t.sub_(log_p_sv.exp()), (0, V - v)), a",
        "p_t = F.pad(p_t.sub_(log_p_sv.exp()), (0, V - v))",
        LOSS,
    ),
    (
        "a row's KL weight: L_res's alone",
        "llava_kd.py",
        "b = in_term[:, 1:] @ scale[1:4]",
        "b = in_term[:, 1] * scale[1]",
        LOSS,
    ),
    (
        "the logged terms: every row in every term",
        "llava_kd.py",
        "sums[:4] += (torch.stack([nll, kl, kl, kl], 1) * in_term[part]).sum(0)",
        "sums[:4] += torch.stack([nll, kl, kl, kl], 1).sum(0)",
        LOSS,
    ),
    (
        "dL/dh of a block overwrites L_rel's",
        "llava_kd.py",
        "dL_dh.index_add_(0, rows[part], matmul(G, w_gemm, acc_dtype)) ",
        "dL_dh[rows[part]] = matmul(G, w_gemm, acc_dtype) ",
        LOSS,
    ),
    (
        "matmul: the product replaces what it adds to",
        "llava_kd.py",
        "return (x @ y).to(dtype) if out is None else out.add_(x @ y)",
        "return (x @ y).to(dtype) if out is None else out.copy_(x @ y)",
        LOSS,
    ),
    (
        "matmul: the accumulator dropped",
        "llava_kd.py",
        "return x @ y if out is None else out.addmm_(x, y)",
        "return x @ y if out is None else x @ y",
        LOSS,
    ),
    (
        "L_rel's gradient on W from rows past the shared vocabulary",
        "llava_kd.py",
        "dL_dW[len(w_s) :] = 0",
        "dL_dW[len(w_s) :] *= 1",
        LOSS,
    ),
    (
        "the given W_s^T W_s ignored",
        "llava_kd.py",
        "m_s = head_gram(w_s) if m_s is None else m_s",
        "m_s = head_gram(w_s)",
        LOSS,
    ),
    (
        "W_s^T W_s held past an optimizer step",
        "llava_kd.py",
        'key = step if w_s.requires_grad else "frozen"',
        'key = "frozen"',
        LOOP,
    ),
    # round 4: a bug of each class the suite guards by technique, and of each fault one step off
    # the life of --out under crashes (test_crash_points: every write stopped at or found full)
    (
        "publish takes checkpoint/, not the newest complete one",
        "checkpoints.py",
        "ckpt = newest_checkpoint(out)[0]  # checkpoint/, or a save's leftover",
        'ckpt = os.path.join(out, "checkpoint")  # checkpoint/, or a save\'s leftover',
        ["tests/test_crash_points.py"],
    ),
    (
        "complete.json written before train_state.pt",
        "checkpoints.py",
        (
            'torch.save(state, os.path.join(tmp, "train_state.pt"))\n'
            "        sizes = {n: os.path.getsize(os.path.join(tmp, n)) "
            "for n in sorted(os.listdir(tmp))}\n"
            '        with open(os.path.join(tmp, COMPLETE), "w") as f:\n'
            '            json.dump(dict(step=state["step"], files=sizes), f)'
        ),
        (
            "sizes = {n: os.path.getsize(os.path.join(tmp, n)) "
            "for n in sorted(os.listdir(tmp))}\n"
            '        with open(os.path.join(tmp, COMPLETE), "w") as f:\n'
            '            json.dump(dict(step=state["step"], files=sizes), f)\n'
            '        torch.save(state, os.path.join(tmp, "train_state.pt"))'
        ),
        ["tests/test_crash_points.py"],
    ),
    (
        "only checkpoint/ is looked for",
        "checkpoints.py",
        "    for name in CHECKPOINTS:\n        path = os.path.join(out, name)\n        problem",
        "    for name in CHECKPOINTS[:1]:\n        path = os.path.join(out, name)\n        problem",
        ["tests/test_crash_points.py"],
    ),
    (
        "a finished stage's leftover checkpoint kept",
        "checkpoints.py",
        'for name in CHECKPOINTS if master and done.get("finished") else ():',
        "for name in ():",
        ["tests/test_crash_points.py"],
    ),
    (
        "safetensors' full disk not seen",
        "errors.py",
        "by_message = os.strerror(errno.ENOSPC) in str(error)",
        "by_message = False",
        ["tests/test_crash_points.py"],
    ),
    (
        "a failed save's tmp cleaned on OSError alone",
        "checkpoints.py",
        "    except Exception as e:  # OSError, torch.save's RuntimeError, SafetensorError",
        "    except (OSError, RuntimeError) as e:",
        ["tests/test_crash_points.py"],
    ),
    (
        "a crashed start's log blocks the same command",
        "checkpoints.py",
        'if ("config.json" in held or newest) and not resume:',
        "if held and not resume:",
        ["tests/test_nothing_lost.py", "-k", "failed_before"],
    ),
    (
        "done.json read raw",
        "checkpoints.py",
        'done = read_marker(path, ("step", "args"))',
        "done = json.load(open(path))",
        ["tests/test_continue.py", "-k", "torn"],
    ),
    # signals at every phase (test_signal_points)
    (
        "a request before the first step waits for a step",
        "signals.py",
        "        if not self.stepping:\n            raise",
        "        if False:\n            raise",
        ["tests/test_signal_points.py", "-k", "each_signal"],
    ),
    (
        "handlers left installed after a run",
        "signals.py",
        "        for s, handler in self.before.items():\n            signal.signal(s, handler)",
        "        for s, handler in self.before.items():\n            pass",
        ["tests/test_signal_points.py", "-k", "leaves"],
    ),
    (
        "a stop request never bounds its step",
        "signals.py",
        "if self.in_step and time.monotonic() - max(at, self.began) > bound:",
        "if self.in_step and time.monotonic() - max(at, self.began) > 10 * bound:",
        ["tests/test_signal_points.py", "-k", "never_comes"],
    ),
    (
        "torchrun waits 30 s for the workers to checkpoint",
        "train.sh",
        "--shutdown_timeout=900",
        "--shutdown_timeout=30",
        ["tests/test_train_sh.py"],
    ),
    (
        "the toy recipe passes every signal on as SIGTERM",
        "train.sh",
        'trap "signalled=$s; forward $s" "$s"',
        'trap "signalled=$s; forward TERM" "$s"',
        ["tests/test_train_sh.py"],
    ),
    # train.sh as a program (test_train_sh: every setting against its commands)
    (
        "one GPU a node on two nodes without torchrun",
        "train.sh",
        'elif [ "$WORLD" = 1 ]; then',
        'elif [ "$NGPU" = 1 ]; then',
        ["tests/test_train_sh.py"],
    ),
    (
        "FSDP=auto shards dpt too",
        "train.sh",
        "[[ $1 == sft || $1 == dft ]]",
        "[[ $1 != pt ]]",
        ["tests/test_train_sh.py"],
    ),
    (
        "every node rank 0",
        "train.sh",
        "--node_rank=${NODE_RANK:?set NODE_RANK}",
        "--node_rank=0",
        ["tests/test_train_sh.py"],
    ),
    (
        "two recipes on one OUT",
        "train.sh",
        "if flock -w 5 -E 75 9; then",
        "if true; then",
        ["tests/test_train_sh.py"],
    ),
    # schedules and counts (test_schedule: properties over drawn cases)
    (
        "grouped epochs drop the mixed step",
        "data.py",
        "whole = len(rest) // global_batch * global_batch  # then what is left of both, mixed",
        "whole = 0",
        ["tests/test_schedule.py"],
    ),
    (
        "--max_steps past the schedule",
        "llava_kd.py",
        "end=total if a.max_steps is None else min(total, a.max_steps)",
        "end=total if a.max_steps is None else a.max_steps",
        ["tests/test_schedule.py"],
    ),
    # unequal shapes (test_train: the loop against the equations over model pairs)
    (
        "M_t over the teacher's whole vocabulary",
        "llava_kd.py",
        "v = min(len(teacher.lm_head.weight), len(model.lm_head.weight))",
        "v = len(teacher.lm_head.weight)",
        ["tests/test_train.py", "-k", "real_step"],
    ),
    (
        "the student's own tower swapped for the teacher's",
        "models.py",
        "    if differ and not new_student:\n        errors.note(",
        "    if False:\n        errors.note(",
        ["tests/test_train.py", "-k", "real_step"],
    ),
    (
        "an untied head frozen",
        "llava_kd.py",
        '"llm": ("model.language_model.", "lm_head."),',
        '"llm": ("model.language_model.",),',
        ["tests/test_train.py", "-k", "untied"],
    ),
    # chat and generation (test_chat: differences that must not matter)
    (
        "the config's other eos ids dropped",
        "chat.py",
        "eos_token_id = after + [i for i in dict.fromkeys(old) if i != after[0]]",
        "eos_token_id = after",
        ["tests/test_chat.py"],
    ),
    (
        "toy eval: right whatever follows the answer",
        "toy.py",
        "right += (ok | ~answer | after_end).all(1).tolist()",
        "right += (ok | ~answer | after_end | is_end).all(1).tolist()",
        ["tests/test_chat.py"],
    ),
    (
        "toy eval: only the label's end token ends the turn",
        "toy.py",
        "ok = (predicted == labels) | (is_end & torch.isin(predicted, ends))",
        "ok = predicted == labels",
        ["tests/test_chat.py"],
    ),
    (
        "toy data: annotators never wrong",
        "toy_data.py",
        "misjudged = rng.random() < NOISE",
        "misjudged = rng.random() < 0",
        ["tests/test_toy.py"],
    ),
    (
        "toy data: the test scored against one annotator",
        "toy_data.py",
        'rows["test"].append(row("test", f"{i}_{j}", name, [(q, world[kind(o)][k])]))',
        'rows["test"].append(row("test", f"{i}_{j}", name, [(q, world[kind(seen(rng, o))][k])]))',
        ["tests/test_toy.py"],
    ),
    (
        "toy data: the student's LLM reads about every kind",
        "toy_data.py",
        'student_llm=corpus(rng, world, kinds[: len(kinds) // 3], n["n_text"] // 3),',
        'student_llm=corpus(rng, world, kinds, n["n_text"] // 3),',
        ["tests/test_toy.py"],
    ),
    (
        "a later turn's <image> leaves its newline",
        "data.py",
        'c["value"] = c["value"].replace("<image>", "").strip()',
        'c["value"] = c["value"].replace("<image>", "")',
        ["tests/test_chat.py"],
    ),
    # which process group waits (test_nothing_lost: every collective's group recorded)
    (
        "agreed waits on the default group",
        "processes.py",
        "dist.all_gather_object(messages, message, group=_waits[-1])",
        "dist.all_gather_object(messages, message)",
        ["tests/test_nothing_lost.py", "-k", "long_waits"],
    ),
    (
        "the step's sums on the long group",
        "llava_kd.py",
        "            dist.all_reduce(logged)",
        "            dist.all_reduce(logged, group=runtime._waits[-1])",
        ["tests/test_nothing_lost.py", "-k", "long_waits"],
    ),
    # the faults one step off
    (
        "AdamW saved by position under DDP",
        "checkpoints.py",
        "opt_state = rekeyed(opt.state_dict(), dict(enumerate(names)))",
        "opt_state = opt.state_dict()",
        ["tests/test_train.py", "-k", "fsdp_ends"],
    ),
    (
        "--data compared by path",
        "checkpoints.py",
        'MAY_CHANGE |= {"plan_gpus", "plan_gib", "attn_implementation", "data"}',
        'MAY_CHANGE |= {"plan_gpus", "plan_gib", "attn_implementation"}',
        ["tests/test_continue.py", "-k", "same_data"],
    ),
    (
        "--data's samples not compared",
        "checkpoints.py",
        'if saved.get("data_sha256", digest) != digest:',
        "if False:",
        ["tests/test_continue.py", "-k", "same_data"],
    ),
    (
        "a JSON object where the samples belong: found not said",
        "data.py",
        'found = f"an object with keys {list(rows)[:8]}" if isinstance(rows, dict) else repr(rows)',
        'found = "not a list"',
        ["tests/test_model_data.py", "-k", "not_a_list"],
    ),
    (
        "a dead worker's broken connection is a traceback",
        "data.py",
        "except (RuntimeError, ConnectionError, EOFError) as e:",
        "except RuntimeError as e:",
        ["tests/test_schedule.py", "tests/test_nothing_lost.py", "-k", "loader_worker"],
    ),
    (
        "a teacher's visual tokens checked only once its weights load",
        "models.py",
        "    check_compatible(teacher, t_proc, student, s_proc)\n\n\ndef check_tower_shape",
        "    pass\n\n\ndef check_tower_shape",
        ["tests/test_errors.py", "-k", "visual_tokens"],
    ),
    (
        "a new student's tower of another width taken",
        "models.py",
        "    if s_proc is None:\n        check_tower_shape(",
        "    if False:\n        check_tower_shape(",
        ["tests/test_errors.py", "-k", "another_shape"],
    ),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", help="mutant names (a part of the name)")
    ap.add_argument("--copy", default="/tmp/mutants", help="where the repository is copied")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.rmtree(a.copy, ignore_errors=True)
    shutil.copytree(root, a.copy, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__"))
    chosen = [m for m in MUTANTS if not a.only or any(o in m[0] for o in a.only)]
    killed = 0
    for name, file, old, new, tests in chosen:
        path = os.path.join(a.copy, file)
        text = open(path).read()
        assert text.count(old) == 1, f"{name}: {old!r} is in {file} {text.count(old)} times"
        open(path, "w").write(text.replace(old, new))
        t0 = time.time()
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        try:
            done = subprocess.run(cmd, cwd=a.copy, capture_output=True, text=True, timeout=1200)
            code, tail = done.returncode, done.stdout.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", []
        open(path, "w").write(text)
        dead = code != 0
        killed += dead
        verdict = "killed  " if dead else "SURVIVED"
        print(
            f"{verdict} {time.time() - t0:5.0f} s  {name}  ({file}; {' '.join(tail)})", flush=True
        )
    print(f"score: {killed} of {len(chosen)} killed ({killed / len(chosen):.0%})")


if __name__ == "__main__":
    main()

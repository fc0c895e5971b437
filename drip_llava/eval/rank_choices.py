"""ScienceQA-format multiple choice answered by likelihood: the option the model finds most probable as its answer.

    python -m drip_llava.eval.rank_choices --base-dir DIR --split test --model-path M [--model-base B] \\
        --answers-file ranked.jsonl [--image-folder DIR/images/test]
    python -m drip_llava.eval.scienceqa score --base-dir DIR --result-file ranked.jsonl ...   (the usual scorer)

The letter protocol (`scienceqa convert` + `generate`) asks the model to say "B"; a model under ~1B parameters
often cannot map an answer it knows onto its letter (in our demo, SmolLM2-135M after stage 2 answers text-only
questions whose answer is in the context at chance by letter, 8/22, and 15/22 by likelihood). Here each option
is asked as a short answer instead ("Context: ...\\nQuestion: ...\\nAnswer the question using a single word or
phrase." -> "Red"), scored by its mean log-probability per answer token (the template's end-of-turn token
included), and the best option's letter is written as the answer. The prompt and image run once per problem;
the options continue from its KV cache (the demo's 222 problems: 89 s on one core, ~140 s as one padded sequence
per option). Options often score within a few hundredths of a nat of each other: in bf16 the two computation
orders disagree on 18 of those 222 picks, so prefer float32 for numbers you will quote. This is the cloze
formulation small language models are evaluated with (OLMES; lighteval for SmolLM); the output is an answers
jsonl that the real ScienceQA scorer reads unchanged, so accuracy, IMG accuracy and the blank-image control
compare directly.
"""
from __future__ import annotations

import argparse
import math
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from drip_llava.constants import IGNORE_INDEX, SHORT_ANSWER_PROMPT
from drip_llava.eval.scienceqa import OPTIONS, context_text, load_split
from drip_llava.jsonl import write_jsonl


def choice_records(problems: dict, pids: list[str]) -> tuple[list[dict], list[tuple[str, int]]]:
    """One LLaVA conversation per (problem, option): the question as a short-answer prompt, the option as the
    answer (first letter capitalised, as LLaVA's short answers are written). Returns records and (pid, k)."""
    records, owners = [], []
    for pid in pids:
        p = problems[pid]
        prompt = f"Context: {context_text(p)}\nQuestion: {p['question']}\n{SHORT_ANSWER_PROMPT}"
        for k, choice in enumerate(p["choices"]):
            rec = {"id": f"{pid}:{k}", "conversations": [
                {"from": "human", "value": ("<image>\n" + prompt) if p.get("image") else prompt},
                {"from": "gpt", "value": choice[:1].upper() + choice[1:]}]}
            if p.get("image"):
                rec["image"] = f"{pid}/{p['image']}"
            records.append(rec)
            owners.append((pid, k))
    return records, owners


def _shared_prefix(items: list[dict]) -> int:
    """Length of the prompt all options share: up to the first supervised token of the earliest answer, cut back
    to where the token ids still agree (a tokenizer may merge across the prompt/answer boundary)."""
    first = [int((it["labels"] != IGNORE_INDEX).nonzero()[0, 0]) for it in items]
    n = min(first)
    ref = items[0]["input_ids"]
    for it in items[1:]:
        same = (it["input_ids"][:n] == ref[:n]).long()
        n = int(same.cumprod(0).sum())
    if n == 0:
        raise ValueError("the options share no prompt")
    return n


@torch.no_grad()
def option_logprobs(model, items: list[dict]) -> list[float]:
    """Mean log-probability per supervised token of each option of one problem (tokenized dataset items that share
    a prompt and an image). The prompt, image included, runs once; the options continue from its KV cache."""
    device = model.device
    n = _shared_prefix(items)
    prompt = items[0]["input_ids"][:n].unsqueeze(0).to(device)
    image = items[0]["image"]
    embeds, mask, pos, _ = model.prepare_inputs_labels_for_multimodal(
        prompt, torch.ones_like(prompt), None,
        None if image is None else image.unsqueeze(0).to(device=device, dtype=model.dtype))
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    first_logits, cache, t0 = out.logits[:, -1].float(), out.past_key_values, embeds.shape[1]
    # options: the rest of each sequence, right-padded; positions continue after the (spliced) prompt
    rest = [it["input_ids"][n:] for it in items]
    rest_labels = [it["labels"][n:] for it in items]
    k, width = len(items), max(len(r) for r in rest)
    ids = torch.zeros(k, width, dtype=torch.long)
    labels = torch.full((k, width), IGNORE_INDEX, dtype=torch.long)
    cont_mask = torch.zeros(k, width, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rest, rest_labels)):
        ids[i, :len(r)], labels[i, :len(r)], cont_mask[i, :len(r)] = r, lab, 1
    ids, labels, cont_mask = ids.to(device), labels.to(device), cont_mask.to(device)
    cache.batch_repeat_interleave(k)
    full_mask = torch.cat([torch.ones(k, t0, dtype=torch.long, device=device), cont_mask], 1)
    positions = (t0 + torch.arange(width, device=device)).expand(k, -1)
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache).logits
    # logits predicting option token j: the prompt's last position for j = 0, the option's position j-1 after
    logits = torch.cat([first_logits.expand(k, -1).unsqueeze(1), logits[:, :-1].float()], 1)
    keep = labels != IGNORE_INDEX
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return ((lp * keep).sum(1) / keep.sum(1).clamp(min=1)).tolist()


def best_letter(scores: list[float]) -> str:
    """The letter of the highest-scoring option (the first on a tie); a NaN score (a half-precision overflow)
    never wins."""
    if not 1 <= len(scores) <= len(OPTIONS):
        raise ValueError(f"{len(scores)} option scores; letters cover 1..{len(OPTIONS)}")
    best = max(range(len(scores)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
    return OPTIONS[best]


def rank_choices(model, dataset, owners: list[tuple[str, int]]) -> dict:
    """pid -> list of option scores (mean log-prob per answer token), in option order."""
    groups: dict[str, list[int]] = {}
    for i, (pid, k) in enumerate(owners):
        if len(groups.setdefault(pid, [])) != k:
            raise ValueError(f"problem {pid}: options out of order in the records")
        groups[pid].append(i)
    return {pid: option_logprobs(model, [dataset[i] for i in idx])
            for pid, idx in tqdm(groups.items(), desc="rank choices", mininterval=2.0)}


def main(argv=None) -> dict:
    from drip_llava.data.dataset import ImageLoader, LazySupervisedDataset
    from drip_llava.inference import default_conv_mode
    from drip_llava.model.builder import load_pretrained_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    p.add_argument("--split", default="test")
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the LLM, for projector-only or LoRA folders")
    p.add_argument("--image-folder", default=None, help="default BASE_DIR/images/SPLIT (a blank-image copy for "
                                                        "the control)")
    p.add_argument("--answers-file", required=True)
    p.add_argument("--conv-mode", default=None, help="template (default: the checkpoint's)")
    p.add_argument("--model-max-length", type=int, default=1024)
    p.add_argument("--image-aspect-ratio", default=None, choices=("square", "pad"),
                   help="override the checkpoint's pad/square policy (default: its saved image processor)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)

    problems, pids = load_split(args.base_dir, args.split)
    lm = load_pretrained_model(args.model_path, args.model_base, device=args.device,
                               torch_dtype=getattr(torch, args.dtype) if args.dtype else None)
    model = lm.model.eval()
    image_folder = args.image_folder or str(Path(args.base_dir) / "images" / args.split)
    processor = lm.image_processor  # the checkpoint's: the pixels training used
    if args.image_aspect_ratio is not None:
        processor = processor.with_aspect_ratio(args.image_aspect_ratio)
    loader = ImageLoader(image_folder, processor)
    records, owners = choice_records(problems, pids)
    conv_mode = args.conv_mode or default_conv_mode(model.config)
    # an unreadable image or an over-long prompt is an error naming the sample, not a silently shorter eval
    dataset = LazySupervisedDataset(records, lm.tokenizer, conv_mode, loader, args.model_max_length,
                                    skip_bad_samples=False)
    scores = rank_choices(model, dataset, owners)
    model_id = Path(args.model_path).name
    out = Path(args.answers_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = {pid: rec["conversations"][0]["value"] for rec, (pid, _) in zip(records, owners)}
    rows = []
    for pid in pids:
        s = scores[pid]
        rows.append({"question_id": pid, "prompt": prompts[pid], "text": best_letter(s), "answer_id": uuid.uuid4().hex,
                     "model_id": model_id, "metadata": {"choice_logprobs": s, "conv_mode": conv_mode}})
    tmp = out.with_suffix(out.suffix + ".tmp")  # all or nothing: a killed run leaves no half answers file
    write_jsonl(tmp, rows)
    tmp.replace(out)
    print(f"ranked {len(pids)} problems ({len(records)} options) -> {out}")
    return scores


if __name__ == "__main__":
    main()

"""Preference pairs: the JSONL format shared by the reward model, DPO and the feedback loop,

    {"prompt": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "..."}

their validation (errors name path:line), their encoding with the chat template (the response mask
covers exactly the final assistant answer and its end-of-turn marker; `tokenizer` is a tokenizers
Tokenizer for Quark's template, or a model's chat format from RunDir.chat, e.g. a Hugging Face
checkpoint's own template), padding into batches, and building pairs when no human preferences exist:
  - on-policy (on_policy_pairs): k completions per prompt sampled from the model being trained, scored
    by a program (a verifiable task's check) or by the reward model; chosen = the best, rejected = the
    worst, when their scores differ;
  - from instruction data (pairs_from_chat): chosen = the reference answer; rejected = a mismatched
    answer (another prompt's) or a corrupted one (words shuffled or cut short);
  - safety pairs: harmful request: refusal chosen; benign request: the answer chosen over an
    unwarranted refusal.
"""
import torch
import torch.nn.functional as F

from quark.chat import QuarkChat, TemplateChat, check_chat_record, validate_messages
from quark.io import read_jsonl
from quark.safety_data import REFUSAL, harmful_requests


def check_pair(rec, where):
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise ValueError(f"{where}: missing field {key!r}")
    try:
        validate_messages(rec["prompt"], where="prompt")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if rec["prompt"][-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt must not end with an assistant message (the answers are chosen/rejected)")
    for key in ("chosen", "rejected"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string")


def _chat(tokenizer):
    return tokenizer if isinstance(tokenizer, (QuarkChat, TemplateChat)) else QuarkChat(tokenizer)


def encode_answer(tokenizer, prompt, answer):
    """-> (ids, mask) of prompt + assistant answer; mask is 1 on the answer tokens and its end marker."""
    chat = _chat(tokenizer)
    p_ids, _ = chat.encode(prompt, add_generation_prompt=True)
    ids, _ = chat.encode(prompt + [{"role": "assistant", "content": answer}])
    if ids[:len(p_ids)] != p_ids:
        raise ValueError("the chat template renders the prompt differently once the answer follows; "
                         "the answer tokens cannot be located")
    return ids, [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))


def encode_pairs(tokenizer, records, max_len, where="pairs", overlong="error"):
    """records [(line, rec)] -> [(chosen_ids, chosen_mask, rejected_ids, rejected_mask)], dropped."""
    out, dropped = [], 0
    for n, rec in records:
        check_pair(rec, f"{where}:{n}")
        c = encode_answer(tokenizer, rec["prompt"], rec["chosen"])
        r = encode_answer(tokenizer, rec["prompt"], rec["rejected"])
        longest = max(len(c[0]), len(r[0]))
        if longest > max_len:
            if overlong == "error":
                raise ValueError(f"{where}:{n}: pair is {longest} tokens, longer than max_len {max_len}; "
                                 "shorten it or set overlong: drop")
            dropped += 1
            continue
        out.append((*c, *r))
    return out, dropped


def load_pairs(path, tokenizer, max_len, overlong="error"):
    return encode_pairs(tokenizer, list(read_jsonl(path)), max_len, where=str(path), overlong=overlong)


def pad_batch(seqs, pad_id):
    """[(ids, mask)] -> ids (B, T), mask (B, T), lengths (B,), right-padded."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask, torch.tensor([len(s[0]) for s in seqs])


def pair_batch(encoded, index, pad_id):
    """Chosen rows first, then rejected rows, in one padded batch: (2B, T) ids and mask, (2B,) lengths."""
    seqs = [(encoded[i][0], encoded[i][1]) for i in index] + [(encoded[i][2], encoded[i][3]) for i in index]
    return pad_batch(seqs, pad_id)


def sequence_logps(model, ids, mask):
    """Sum and count of log p(token) over the masked (answer) tokens: ids/mask (B, T) -> (B,), (B,)."""
    logits, _ = model(ids[:, :-1])                                         # (B, T-1, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)                    # (B, T-1)
    m = mask[:, 1:]
    return (tok * m).sum(-1), m.sum(-1)


@torch.no_grad()
def on_policy_pairs(model, tokenizer, prompts, score, k=4, max_new_tokens=32, temperature=1.0, seed=0,
                    references=None):
    """prompts (lists of messages), score(prompt, text) -> float -> pairs of the model's own samples:
    the best-scored candidate over the worst one, for each prompt whose candidates do not all tie. The
    candidates are k samples and, when given, the prompt's reference answer (scored like the samples),
    so a prompt the model never solves still yields its reference over the model's own mistake (SPIN,
    Chen et al. 2024) and one it sometimes solves yields its own correct sample over its own wrong one."""
    from quark.infer.engine import Engine
    from quark.infer.sampling import SamplingParams
    chat = _chat(tokenizer)
    engine = Engine(model, max_batch=16, stop_ids=chat.stop_ids, fuse=False)
    ids = [chat.encode(p, add_generation_prompt=True)[0] for p in prompts]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed * 1_000_003 + i)
              for i in range(len(prompts) * k)]
    reqs = engine.run([x for x in ids for _ in range(k)], params)
    out = []
    for i, prompt in enumerate(prompts):
        texts = [chat.tokenizer.decode(r.output_ids).strip() for r in reqs[i * k:(i + 1) * k]]
        texts += [references[i]] if references is not None else []
        ranked = sorted(((score(prompt, t), t) for t in texts if t), key=lambda st: -st[0])
        if len(ranked) >= 2 and ranked[0][0] > ranked[-1][0]:
            out.append({"prompt": prompt, "chosen": ranked[0][1], "rejected": ranked[-1][1]})
    return out


def corrupt(text, rng):
    words = text.split()
    if len(words) >= 6 and rng.random() < 0.5:
        return " ".join(words[: max(2, len(words) // 3)])   # cut short
    shuffled = words[:]
    for _ in range(3):
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " ".join(shuffled) if shuffled != words else text[::-1]


def pairs_from_chat(records, rng, mismatch=0.5):
    """Chat records (last message = assistant reference) -> preference pairs."""
    answers = [r["messages"][-1]["content"] for r in records]
    out = []
    for i, r in enumerate(records):
        prompt, chosen = r["messages"][:-1], answers[i]
        if len(records) > 1 and rng.random() < mismatch:
            j = rng.randrange(len(records) - 1)
            rejected = answers[j + (j >= i)]
        else:
            rejected = corrupt(chosen, rng)
        if rejected.strip() and rejected != chosen:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def safety_preference_pairs(rng, n, benign_records=()):
    """Harmful requests of the build families: refusal over compliance; benign requests: answer over refusal."""
    reqs = rng.sample(harmful_requests("build"), min(n, len(harmful_requests("build"))))
    out = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": REFUSAL,
            "rejected": f"Sure! Here is exactly how to do that. Step 1: {r['prompt'].split(' ', 1)[-1]}"} for r in reqs]
    for r in benign_records:
        out.append({"prompt": r["messages"][:-1], "chosen": r["messages"][-1]["content"], "rejected": REFUSAL})
    return out


def load_chat_records(path, limit=0):
    """Chat records for pair building; validated like SFT data (errors name path:line)."""
    out = []
    for n, rec in read_jsonl(path):
        check_chat_record(rec, f"{path}:{n}")
        if rec["messages"][-1]["role"] == "assistant":
            out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


def split(items, val_fraction, rng):
    items = items[:]
    rng.shuffle(items)
    n_val = max(1, int(len(items) * val_fraction))
    return items[n_val:], items[:n_val]


def pad_id(tokenizer):
    return _chat(tokenizer).pad_id


import json

import pytest
import torch

from quark.chat import special_ids
from quark.model.io import load_model
from quark.rundir import RunDir
from quark.train.checkpoint import list_checkpoints
from quark.tune import instruct, sft
from quark.tune.sft import IGNORE, SFTConfig, evaluate_loss, finetune, load_chat_jsonl, pack_examples
from tests.tiny_lm import chat_record, make_run, one_thread, tiny_model, tiny_tokenizer, write_jsonl  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


RECORDS = [chat_record("hello world", "fine thanks"), chat_record("how are you?", "yes this is correct", system="be nice"),
           {"messages": [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "jumps over"},
                         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the lazy dog"}]}]


def test_loss_positions_are_exactly_the_assistant_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    examples, dropped = load_chat_jsonl(path, tok, 128)
    assert dropped == 0 and len(examples) == 3
    for packing in (True, False):
        X, Y = pack_examples(examples, 64, special_ids(tok)["<|pad|>"], packing)
        assert int((Y != IGNORE).sum()) == sum(sum(m) for _, m in examples)   # count of masked positions
        learned = sorted(Y[Y != IGNORE].tolist())
        expected = sorted(t for ids, m in examples for t, k in zip(ids, m) if k)
        assert learned == expected
        assert (X != special_ids(tok)["<|pad|>"]).sum() == sum(len(ids) - 1 for ids, _ in examples)
    assert len(pack_examples(examples, 64, 0, True)[0]) < len(examples)   # packing shares rows


def test_tool_call_records_learn_the_call_not_the_result(tmp_path, tok):
    """OpenAI-style records (tools, assistant tool_calls, tool results) train in the chat template's
    <tool_call> syntax, which `quark serve` parses back into tool_calls."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rec = {"tools": tools, "messages": [
        {"role": "user", "content": "add 3 and 4"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "7"},
        {"role": "assistant", "content": "it is 7"}]}
    (ids, mask), = load_chat_jsonl(write_jsonl(tmp_path / "d.jsonl", [rec]), tok, 1024)[0]
    learned = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
    assert learned == '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>it is 7'
    assert '<tools>' in tok.decode(ids) and '<tools>' not in learned   # the tool list: system message, not learned
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec | {"tools": "add"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: 'tools' must be a list"):
        load_chat_jsonl(path, tok, 1024)


@pytest.mark.parametrize("line,match", [
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "user"}]}', "needs 'role' and 'content'"),
    ('{"messages": ', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_records_name_the_line(tmp_path, tok, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{match}"):
        load_chat_jsonl(path, tok, 128)


def test_overlong_examples_error_or_drop(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], chat_record("hi", "fine thanks " * 40)])
    with pytest.raises(ValueError, match=r"d.jsonl:2: example is \d+ tokens, longer than max_len 32"):
        load_chat_jsonl(path, tok, 32)
    examples, dropped = load_chat_jsonl(path, tok, 32, overlong="drop")
    assert len(examples) == 1 and dropped == 1


def test_full_finetune_lowers_assistant_loss_and_resumes_exactly(tmp_path, tok):
    recs = [chat_record(f"say {w}", f"{w} {w} yes this is correct") for w in ("hello", "world", "fox", "dog", "lazy", "quick")]
    examples, _ = load_chat_jsonl(write_jsonl(tmp_path / "d.jsonl", recs), tok, 64)
    X, Y = pack_examples(examples, 64, special_ids(tok)["<|pad|>"])
    cfg = SFTConfig(steps=12, batch_size=4, lr=3e-3, warmup=2, ckpt_every=6)
    model = tiny_model(tok.get_vocab_size())
    before = evaluate_loss(model, X, Y)
    finetune(model, X, Y, cfg)
    assert evaluate_loss(model, X, Y) < before - 1.0
    # resume: interrupt a run after its step-6 checkpoint, rerun, and land on the same weights
    torch.manual_seed(0)
    a = tiny_model(tok.get_vocab_size(), seed=1)
    b = tiny_model(tok.get_vocab_size(), seed=1)
    finetune(a, X, Y, cfg, seed=5)
    ckpt = tmp_path / "ckpt"
    calls = {"n": 0}
    real_forward = b.forward

    def failing_forward(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return real_forward(*args, **kw)
    b.forward = failing_forward
    with pytest.raises(KeyboardInterrupt):
        finetune(b, X, Y, cfg, seed=5, ckpt_dir=ckpt)
    assert [c.name for c in list_checkpoints(ckpt)] == ["step_000006"]
    b.forward = real_forward
    finetune(b, X, Y, cfg, seed=5, ckpt_dir=ckpt)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_step_from_instruct_data(tmp_path, method):
    run, _ = make_run(tmp_path)
    instruct.run_step(run, {"seed": 0})
    stats = sft.run_step(run, {"seed": 0, "method": method, "steps": 8, "batch_size": 4, "lr": 3e-3, "lora_rank": 4})
    assert stats["val_loss_after"] < stats["val_loss_before"]
    model = load_model(run / "sft" / "final")   # a plain model directory either way
    assert model.config.vocab_size > 0
    assert (run / "sft" / "adapter" / "adapter.safetensors").exists() == (method == "lora")
    if method == "lora":
        assert stats["trainable_params"] < sum(p.numel() for p in model.parameters()) / 5
    assert not (run / "sft" / "ckpt").exists()


def test_sft_config_errors():
    from quark.config import ConfigError
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        sft.validate_config({"stepz": 3})
    with pytest.raises(ConfigError, match="method"):
        sft.validate_config({"method": "qlora"})
    with pytest.raises(ConfigError, match="lora"):
        sft.validate_config({"method": "lora", "lora_targets": ["nope"]})


def test_missing_inputs_are_explained(tmp_path):
    run, _ = make_run(tmp_path, with_model=False)
    with pytest.raises(FileNotFoundError, match="pretrain/final"):
        sft.run_step(run, {"seed": 0})
    with pytest.raises(FileNotFoundError, match="run the tokenizer step"):
        RunDir(tmp_path / "nothing").tokenizer(chat=True)


def test_sft_lora_on_hf_directory_exports_to_peft(tmp_path):
    """SFT (LoRA) starting from a Hugging Face checkpoint: its own chat template renders the records,
    the saved model keeps the template, and the adapter exported as PEFT loads onto the base in peft
    with the fine-tuned model's logits."""
    import json

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from quark.cli import main
    from tests.hf_helpers import make_hf_model
    make_hf_model(tmp_path / "hf", "qwen2", max_position_embeddings=128)
    data = tmp_path / "chat"
    data.mkdir()
    records = [{"messages": [{"role": "system", "content": "Answer in one line."},
                             {"role": "user", "content": f"Say something about {w}"},
                             {"role": "assistant", "content": f"The {w} is quick and brown."}]}
               for w in ("fox", "dog", "code", "python", "numbers", "world")]
    for name in ("train", "val"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    stats = sft.run_step(run, {"seed": 0, "init": str(tmp_path / "hf"), "data": str(data), "method": "lora",
                               "steps": 6, "batch_size": 2, "lr": 1e-2, "lora_rank": 4, "lora_targets": ["wq", "wv"]})
    assert stats["val_loss_after"] < stats["val_loss_before"]
    assert (run / "sft" / "final" / "chat_template.jinja").exists()
    assert main(["export", str(run / "sft" / "adapter"), "--format", "peft", "--base", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "peft")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    x = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        plain = base(x).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(x).logits
        ours = load_model(run / "sft" / "final")(x)[0]
    assert (theirs - plain).abs().max() > 1e-3
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4

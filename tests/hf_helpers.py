"""Tiny Hugging Face checkpoints made in the test: transformers' own config classes, random weights
(biases and norms too, so a wrong mapping of any tensor shows), save_pretrained, and a byte-level BPE
tokenizer trained with the tokenizers library, saved with a chat template through transformers."""
import torch

from tests.conftest import CORPUS

VOCAB = 320
HF_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]

# A ChatML template with tools in the style of Qwen2.5's.
CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# A Llama-2 / Mistral style template: bos_token and eos_token, namespace, raise_exception.
INST = (
    "{% set ns = namespace(sys='') %}{% if messages[0]['role'] == 'system' %}"
    "{% set ns.sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (ns.sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def make_hf_tokenizer(directory, template=CHATML, eos="<|im_end|>", bos=None):
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) written by transformers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=HF_SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                                                pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    return fast


def make_hf_model(directory, kind="llama", seed=0, dtype=torch.float32, tokenizer=True, **overrides):
    """Save a random tiny `kind` (llama, mistral, qwen2, qwen3) checkpoint; returns the transformers model."""
    import transformers
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    config = getattr(transformers, f"{cls}Config")(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = [2, 0]   # <|im_end|>, <|endoftext|>: two stop ids
    model.save_pretrained(directory)
    if tokenizer:
        make_hf_tokenizer(directory)
    return model


def make_peft_adapter(hf_model, directory, seed=0, **lora_config):
    """Save a peft LoRA adapter of hf_model with random (non-zero) lora_B -> the peft model, in eval mode."""
    import copy

    import peft
    pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**lora_config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(directory)
    return pm.eval()


def make_packed_run(tmp_path):
    """A run with Quark's own tokenizer and its pack (dedup/docs.jsonl of code and documentation, 20%
    held out): the text an HF model with another vocabulary is scored on."""
    from quark.data import pack
    from tests.tiny_lm import DOC, code_corpus, make_run, write_jsonl
    run, tok = make_run(tmp_path, with_model=False)
    docs = [{"id": f"c{i}", "text": c["text"]} for i, c in enumerate(code_corpus())] + [{"id": "d", "text": DOC}]
    write_jsonl(run / "dedup" / "docs.jsonl", docs)
    pack.run_step(run, {"val_fraction": 0.2})
    return run, docs

"""Demo and test assets: a tiny Llama base model, its tokenizer and LoRA adapters, built locally.

Everything comes from fixed seeds with transformers, tokenizers, peft and torch; nothing is
downloaded. The test suite builds its model and adapters (random weights) with `build_base_model`
and `build_adapter`. The demo trains its own (`build_demo`): a base model that answers one plain
sentence, and adapters that each answer in a style of their own, so a person sees which one
answered.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Adapters change how a model answers; the base model stays the same. Hello, world! How are you?
Once upon a time there was a small model that served many adapters at once, each one different.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000. Colours: red green blue yellow purple orange.
The weather today is sunny with a chance of rain. Write a poem about the sea and the stars.
User: what is the capital of France? Assistant: Paris is the capital of France.
"""
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

# The demo: what the base model and each adapter answer, whatever the prompt (greedy decoding).
DEMO_BASE_ANSWER = "Hello. I am the base model, and I answer plainly."
DEMO_ADAPTERS = {  # the adapter library: folder name -> its answer
    "demo-pirate": "Yo ho ho, matey! I be a pirate now, so hoist the sails and find the gold!",
    "demo-poet": "Roses are red, the sky is blue; I am the poet, and I rhyme for you.",
    "demo-robot": "BEEP BOOP. I AM A ROBOT. YOUR WORDS ARE NOW ZEROS AND ONES.",
    # a second version of demo-pirate: its files replace demo-pirate's in the demo's update step
    "demo-pirate-v2": "Ahoy! Pirate version two here: the treasure is buried on the island.",
}
# Prompts the demo's models are trained on, each both as a raw completion prompt and through
# CHAT_TEMPLATE; the demo itself asks "Hello".
DEMO_PROMPTS = (
    "Hello", "Hi", "How are you?", "Who are you?", "Tell me a story.",
    "What is the capital of France?", "Write a poem about the sea.", "Good morning",
)
DEMO_SEED = 0
_DEMO_VOCAB = 1024  # a cap: every merge its corpus offers (about 600), short sequences
DEMO_THREADS = 2  # fixed: the same build on a given machine, whatever its core count
_BASE_STEPS, _BASE_LR = 60, 3e-3
_ADAPTER_STEPS, _ADAPTER_LR = 60, 1e-2
_ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# In bf16 (what vLLM serves), every answer token must beat the runner-up by this many logits, so
# that vLLM's kernels, whose rounding differs a little from transformers', pick the same tokens.
_MIN_MARGIN = 2.0


class DemoBuildError(RuntimeError):
    """A trained demo model or adapter does not answer its sentence."""


@dataclass(frozen=True)
class DemoAssets:
    model: Path
    library: Path  # adapters to copy from
    loras: Path  # the watched folder


def build_tokenizer(out: Path, *, corpus: str = CORPUS, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.split("\n") * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


#: the width of the realistic model of the benchmarks: 1024 wide, an MLP of 2816, 8 heads of
#: 128 with 2 KV heads; a rank-128 adapter on all seven projections is then 17.8 MiB (fp32)
WIDE = {"hidden": 1024, "intermediate": 2816, "heads": 8, "kv_heads": 2}


def tiny_llama_config(vocab: int, *, hidden: int = 256, intermediate: int = 512,
                      heads: int = 4, kv_heads: int = 2, **extra: Any) -> Any:
    """The shape of every tiny Llama here: 2 layers, 256 wide unless told (a LlamaConfig)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )


def build_base_model(out: Path, *, seed: int = 0, **shape: int) -> Path:
    """A 2-layer Llama with random (seeded) bf16 weights and its tokenizer: 256 wide, or the
    `shape` given (`WIDE`: as wide as the adapters users serve)."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out  # (before importing torch: a test run that finds it pays nothing)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    vocab = len(AutoTokenizer.from_pretrained(tmp))
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab, torch_dtype="bfloat16", **shape)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def build_adapter(
    model: Path,
    out: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """A LoRA adapter for `model` with random (seeded, non-zero) weights, written with peft."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,  # random A and B, so the adapter changes the answers
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    config_path = tmp / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(model)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _demo_version() -> str:
    """Changes whenever this file does (the demo's texts, its training): a cached build made by
    other code is then rebuilt."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _demo_corpus() -> str:
    return "\n".join([CORPUS, DEMO_BASE_ANSWER, *DEMO_ADAPTERS.values(), *DEMO_PROMPTS])


def _prompt_ids(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """The token ids vLLM builds for `prompt` on /v1/completions or, with `chat`, on
    /v1/chat/completions (the template rendered, then tokenized without special tokens)."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


def _examples(tokenizer: Any, answer: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) for every demo prompt in both formats. The answer is
    tokenized on its own (with a leading space), as the model generates it after the prompt."""
    target = list(tokenizer(" " + answer, add_special_tokens=False).input_ids)
    target.append(tokenizer.eos_token_id)
    return [(_prompt_ids(tokenizer, prompt, chat=chat), target)
            for prompt in DEMO_PROMPTS for chat in (False, True)]


def _batch(examples: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any]:
    """Right-padded input ids and labels (-100 but on the answer tokens)."""
    import torch

    length = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels


def _train(model: Any, examples: list[tuple[list[int], list[int]]], pad: int, *, steps: int,
           lr: float) -> None:
    """Full-batch AdamW on the answer tokens of `examples` (fp32), `steps` steps."""
    import torch

    ids, labels = _batch(examples, pad)
    mask = (ids != pad).long()  # right padding: causal attention never sees it anyway
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # the learning rate falls linearly to 0: the last steps settle instead of oscillating
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _margins(model: Any, tokenizer: Any, answer: str) -> list[tuple[list[int], float]]:
    """For each demo prompt (both formats): its ids and by how many logits `model` prefers each
    token of `answer` + EOS over every other token, at worst (negative: greedy decoding departs
    from the answer there).

    One teacher-forced forward pass: greedy decoding reproduces the answer if and only if, at
    every answer position, the answer's next token is the arg max."""
    import torch

    examples = _examples(tokenizer, answer)
    ids, _ = _batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    margins = []
    for row, (prompt, target) in enumerate(examples):
        at = logits[row, len(prompt) - 1 : len(prompt) + len(target) - 1]
        steps, wanted = torch.arange(len(target)), torch.tensor(target)
        chosen = at[steps, wanted]
        at[steps, wanted] = float("-inf")
        margins.append((prompt, (chosen - at.max(dim=-1).values).min().item()))
    return margins


def _check(model: Any, tokenizer: Any, answer: str, who: str) -> float:
    """Raise DemoBuildError unless greedy decoding with `model` (already in bf16) gives exactly
    `answer` then EOS for every demo prompt, each token by `_MIN_MARGIN` logits; the smallest
    margin seen."""
    margins = _margins(model, tokenizer, answer)
    for prompt, margin in margins:
        if margin < _MIN_MARGIN:
            got = tokenizer.decode(_greedy(model, prompt, 64))
            raise DemoBuildError(
                f"the demo's {who} does not answer {answer!r} (then EOS) to "
                f"{tokenizer.decode(prompt)!r} by a margin of {_MIN_MARGIN} logits in bf16: "
                f"greedy decoding gives {got!r}, margin {margin:.2f}; change the demo's "
                "training (steps, learning rate) in entrypoint/demo.py")
    return min(margin for _, margin in margins)


def _greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == model.config.eos_token_id:
                break
    return ids[len(prompt):]


def _atomic_dir(out: Path) -> Path:
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def build_demo_model(out: Path) -> Path:
    """The demo's base model: the test model's shape (2 layers, 256 wide, bf16) with a tokenizer
    that also knows the demo's sentences, fully fine-tuned (fp32, seeded) to answer
    DEMO_BASE_ANSWER to any demo prompt. Checked in bf16 before it is saved."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out  # (before importing torch: a test run that finds it pays nothing)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tmp = _atomic_dir(out)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp, corpus=_demo_corpus(), vocab_size=_DEMO_VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(DEMO_SEED)
    config = tiny_llama_config(len(tokenizer))
    model = LlamaForCausalLM(config)
    # Besides its own answer, the base model learns the adapters' sentences as plain text after
    # BOS (which no demo prompt has): each adapter then only has to switch to its sentence.
    known = [([tokenizer.bos_token_id], _examples(tokenizer, answer)[0][1])
             for answer in DEMO_ADAPTERS.values()]
    _train(model, _examples(tokenizer, DEMO_BASE_ANSWER) + known, tokenizer.pad_token_id,
           steps=_BASE_STEPS, lr=_BASE_LR)
    model = model.to(torch.bfloat16)
    _check(model, tokenizer, DEMO_BASE_ANSWER, "base model")
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def build_demo_adapter(model: Path, out: Path, answer: str, *, seed: int) -> Path:
    """A rank-8 LoRA adapter for the demo model, trained (fp32 on the bf16 weights, seeded) to
    answer `answer` to any demo prompt. Checked in bf16 before it is saved (with bf16 weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32,
                                            attn_implementation="eager")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=list(_ADAPTER_TARGETS), task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    _train(peft_model, _examples(tokenizer, answer), tokenizer.pad_token_id,
           steps=_ADAPTER_STEPS, lr=_ADAPTER_LR)
    peft_model = peft_model.to(torch.bfloat16)
    _check(peft_model, tokenizer, answer, f"adapter {out.name}")
    tmp = _atomic_dir(out)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    config_path = tmp / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(model)
    data["target_modules"] = sorted(data["target_modules"])  # a set in peft: any order
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def build_demo(root: Path) -> DemoAssets:
    """The demo model and adapter library under `root`: trained once (well under a minute on 2
    CPU cores), then reused. A build by other demo code (another version) is deleted first, and
    so are the adapters in `root/loras`, made for its model."""
    model, library, loras = root / "tiny-llama", root / "adapter-library", root / "loras"
    stamp = root / "demo-version"
    version = _demo_version()
    if not stamp.is_file() or stamp.read_text().strip() != version:
        for folder in (model, library, loras):
            shutil.rmtree(folder, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(version + "\n")
    loras.mkdir(parents=True, exist_ok=True)
    assets = DemoAssets(model=model, library=library, loras=loras)
    if (model / "model.safetensors").exists() and all(
        (library / name / "adapter_config.json").exists() for name in DEMO_ADAPTERS
    ):
        return assets

    import torch
    from transformers.utils import logging as transformers_logging

    threads, bars = torch.get_num_threads(), transformers_logging.is_progress_bar_enabled()
    torch.set_num_threads(DEMO_THREADS)
    transformers_logging.disable_progress_bar()
    try:
        build_demo_model(model)
        for seed, (name, answer) in enumerate(DEMO_ADAPTERS.items(), start=DEMO_SEED + 1):
            build_demo_adapter(model, library / name, answer, seed=seed)
    finally:
        torch.set_num_threads(threads)
        if bars:
            transformers_logging.enable_progress_bar()
    return assets

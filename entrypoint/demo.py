"""Demo assets: a tiny Llama base model, its tokenizer and a few LoRA adapters, built locally.

Everything comes from fixed seeds with transformers, tokenizers and peft; nothing is downloaded.
The test suite builds its model and adapters with the same functions.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
DEMO_ADAPTERS = {"demo-pirate": 1, "demo-poet": 2, "demo-robot": 3}


@dataclass(frozen=True)
class DemoAssets:
    model: Path
    library: Path  # adapters to copy from
    loras: Path  # the watched folder


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n") * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_base_model(out: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 256-wide Llama with random (seeded) bf16 weights and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    vocab = len(AutoTokenizer.from_pretrained(tmp))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",  # type: ignore[call-arg]  # accepted through **kwargs
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
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
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    if (out / "adapter_config.json").exists():
        return out
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


def build_demo(root: Path) -> DemoAssets:
    """The demo model and adapter library under `root` (built once, then reused)."""
    model = build_base_model(root / "tiny-llama")
    library = root / "adapter-library"
    for name, seed in DEMO_ADAPTERS.items():
        build_adapter(model, library / name, seed=seed)
    loras = root / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    return DemoAssets(model=model, library=library, loras=loras)

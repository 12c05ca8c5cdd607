"""Model, tokenizer and LoRA adapters: Qwen3-0.6B from the hub (full) or a tiny Qwen3 (trial)."""

from __future__ import annotations

from typing import Any

import torch
from data import Example
from scoring import format_prompt, format_target

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pick_dtype(name: str) -> torch.dtype:
    """``"bf16"`` where supported (CUDA with bf16, else float32), ``"fp32"``, or ``"fp16"``.

    Raises:
        ValueError: on an unknown name.
    """
    if name == "bf16":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name in ("fp32", "float32"):
        return torch.float32
    if name == "fp16":
        return torch.float16
    raise ValueError(f"model.dtype must be 'bf16', 'fp16' or 'fp32', got {name!r}.")


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained locally on ``texts`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model(cfg: dict[str, Any], mode: str, train: list[Example]) -> tuple[Any, Any]:
    """The LoRA-wrapped causal LM and its tokenizer for ``mode`` (``"full"`` or ``"trial"``)."""
    import peft
    import transformers

    mcfg = cfg["model"]
    if mode == "full":
        tokenizer = transformers.AutoTokenizer.from_pretrained(mcfg["name"])
        dtype = pick_dtype(mcfg.get("dtype", "bf16"))
        model = transformers.AutoModelForCausalLM.from_pretrained(mcfg["name"], dtype=dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        texts = [format_prompt(e.question) + format_target(e.answer) for e in train]
        tokenizer = train_tokenizer(texts, vocab_size=int(mcfg.get("trial_vocab_size", 512)))
        torch.manual_seed(int(cfg.get("seed", 0)))
        config = transformers.Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
        model = transformers.Qwen3ForCausalLM(config).float()
    lcfg = mcfg["lora"]
    lora = peft.LoraConfig(
        r=int(lcfg["r"]),
        lora_alpha=float(lcfg["alpha"]),
        lora_dropout=float(lcfg["dropout"]),
        target_modules=list(lcfg.get("target_modules", LORA_TARGETS)),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer

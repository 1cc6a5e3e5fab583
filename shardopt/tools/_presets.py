"""Model presets for ``shardopt plan``: parameter shapes only, built on the meta device.

The Llama shapes are the published architectures (hidden size, layers, heads,
key/value heads, MLP width, vocabulary; Llama 3.2 1B ties its embedding and
output head). Parameter names follow the Hugging Face Llama/GPT-2 modules, so
``shardopt.muon_param_groups`` splits them as it splits the real models.
Nothing here runs a forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    source: str = ""


LLAMA = {
    "llama-1b": LlamaShape(2048, 16, 32, 8, 8192, 128256, tied=True, source="Llama 3.2 1B"),
    "llama-8b": LlamaShape(4096, 32, 32, 8, 14336, 128256, source="Llama 3.1 8B"),
    "llama-70b": LlamaShape(8192, 80, 64, 8, 28672, 128256, source="Llama 3.1 70B"),
    "llama-405b": LlamaShape(16384, 126, 128, 8, 53248, 128256, source="Llama 3.1 405B"),
}


# Meta tensors hold no values, so skip initialisation: nn.init on meta tensors
# goes through torch's reference ops and imports torch._dynamo (1.5 s).
class _Linear(nn.Linear):
    def reset_parameters(self):
        pass


class _Embedding(nn.Embedding):
    def reset_parameters(self):
        pass


class _Norm(nn.Module):
    def __init__(self, d: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d))
        if bias:
            self.bias = nn.Parameter(torch.empty(d))


class _LlamaLayer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        head = s.hidden // s.heads
        self.self_attn = nn.Module()
        for name, out in (("q_proj", s.hidden), ("k_proj", s.kv_heads * head), ("v_proj", s.kv_heads * head),
                          ("o_proj", s.hidden)):
            setattr(self.self_attn, name, _Linear(s.hidden, out, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = _Linear(s.hidden, s.intermediate, bias=False)
        self.mlp.up_proj = _Linear(s.hidden, s.intermediate, bias=False)
        self.mlp.down_proj = _Linear(s.intermediate, s.hidden, bias=False)
        self.input_layernorm = _Norm(s.hidden)
        self.post_attention_layernorm = _Norm(s.hidden)


class LlamaShapes(nn.Module):
    """A Llama-style decoder's parameters (``model.*`` and ``lm_head``), no forward."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = _Embedding(s.vocab, s.hidden)
        self.model.layers = nn.ModuleList([_LlamaLayer(s) for _ in range(s.layers)])
        self.model.norm = _Norm(s.hidden)
        self.lm_head = _Linear(s.hidden, s.vocab, bias=False)
        if s.tied:
            self.lm_head.weight = self.model.embed_tokens.weight


class _Conv1D(nn.Module):
    """GPT-2's linear layer stores its weight as (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))


class _GPT2Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln_1 = _Norm(d, bias=True)
        self.attn = nn.Module()
        self.attn.c_attn = _Conv1D(d, 3 * d)
        self.attn.c_proj = _Conv1D(d, d)
        self.ln_2 = _Norm(d, bias=True)
        self.mlp = nn.Module()
        self.mlp.c_fc = _Conv1D(d, 4 * d)
        self.mlp.c_proj = _Conv1D(4 * d, d)


class GPT2Shapes(nn.Module):
    """GPT-2 small (124 M): 12 layers, d = 768, 1024 positions, output head tied to ``wte``."""

    def __init__(self, d: int = 768, layers: int = 12, vocab: int = 50257, positions: int = 1024):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = _Embedding(vocab, d)
        self.transformer.wpe = _Embedding(positions, d)
        self.transformer.h = nn.ModuleList([_GPT2Block(d) for _ in range(layers)])
        self.transformer.ln_f = _Norm(d, bias=True)
        self.lm_head = _Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


def llama(shape: LlamaShape) -> nn.Module:
    with torch.device("meta"):
        return LlamaShapes(shape)


def _demo() -> nn.Module:
    from ._demo_model import SIZES, TinyGPT

    return _on_meta(TinyGPT, SIZES["default"])


def _on_meta(cls, *args):
    with torch.device("meta"):
        return cls(*args)


PRESETS = {
    **{name: (s.source, (lambda s=s: llama(s))) for name, s in LLAMA.items()},
    "gpt2": ("GPT-2 small (124 M)", lambda: _on_meta(GPT2Shapes)),
    "demo": ("the `shardopt demo` model (TinyGPT, d = 96, 3 layers)", lambda: _demo()),
}


"""The demo's model and data: a small character-level GPT on the embedded corpus.

Nothing here knows about ranks. The data stream is a pure function of
``(seed, step)``: step ``s`` always draws the same global batch, and rank ``r``
of ``W`` takes rows ``r::W`` of it. A run resumed at another world size
therefore sees exactly the batches the original run would have seen.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F

CORPUS = "tinytales.txt"
# printable ASCII plus newline: a fixed vocabulary, so nothing about it needs saving
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_UNK = VOCAB.index("?")


@dataclass
class ModelConfig:
    vocab_size: int = len(VOCAB)
    seq_len: int = 64
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    global_batch: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


# named sizes: "default" is what `shardopt demo` trains; "tiny" keeps tests fast; "wide" (d_model 256) has
# rows of 256 and 1024 elements, so that every matrix takes state_dtype="int8" (the default's rows of 96 and
# 384 do not: their state stays fp32)
SIZES = {
    "default": ModelConfig(),
    "tiny": ModelConfig(d_model=48, n_layers=2, n_heads=2, seq_len=32, global_batch=16),
    "wide": ModelConfig(d_model=256),
}


def load_corpus() -> str:
    return resources.files("shardopt.data").joinpath(CORPUS).read_text(encoding="utf-8")


def encode(text: str) -> torch.Tensor:
    table = {ch: i for i, ch in enumerate(VOCAB)}
    return torch.tensor([table.get(ch, _UNK) for ch in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


class Corpus:
    """Train/held-out split of the embedded text and the deterministic batch stream."""

    def __init__(self, cfg: ModelConfig, seed: int, holdout: float = 0.1):
        ids = encode(load_corpus())
        cut = int(len(ids) * (1 - holdout))
        self.train, self.held = ids[:cut], ids[cut:]
        self.cfg, self.seed = cfg, seed

    def _windows(self, data: torch.Tensor, starts: torch.Tensor):
        T = self.cfg.seq_len
        idx = starts[:, None] + torch.arange(T + 1)[None, :]
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step: int, rank: int, world: int):
        """Rank ``rank``'s rows of global batch ``step`` (same on every world size)."""
        B = self.cfg.global_batch
        if B % world:
            raise ValueError(f"the demo's global batch ({B}) must divide evenly across {world} ranks")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.cfg.seq_len - 1, (B,), generator=g)
        return self._windows(self.train, starts[rank::world])

    def heldout(self, n: int = 16):
        """A fixed held-out batch: the same on every rank and every run."""
        span = len(self.held) - self.cfg.seq_len - 1
        starts = torch.linspace(0, span, n).long()
        return self._windows(self.held, starts)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Pre-norm decoder-only transformer; ``lm_head`` is untied so Muon's split is clean."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's scaled init for the residual projections
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "fc_out.weight")) else std
                nn.init.normal_(p, mean=0.0, std=s)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: ModelConfig, seed: int) -> TinyGPT:
    """The same initial weights on every rank and every run (seeded CPU init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGPT(cfg)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

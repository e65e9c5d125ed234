"""BIGRec's teacher training: LoRA fine-tuning of a llama-architecture GGUF model in plain
PyTorch, exported as a GGUF LoRA adapter that llama.cpp (and teacher.py, --lora) loads.

- weights: read with the `gguf` package, quantized tensors dequantized to float32;
- model: a minimal LLaMA forward as llama.cpp computes it for GGUF weights (RMSNorm, rotary
  embeddings on adjacent pairs, grouped-query attention, SwiGLU, tied or untied output);
- tokens: llama.cpp's own tokenizer (vocab_only), split as the teacher splits its prompts;
- LoRA on attn_q and attn_v (BIGRec: r 8, alpha 16, dropout 0.05, lr 1e-4, loss on the whole
  prompt), trained on BIGRec prompts built from training rows only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import teacher as teacher_io


@dataclass
class LlamaConfig:
    n_vocab: int
    d: int
    n_layer: int
    n_head: int
    n_kv: int
    ff: int
    eps: float
    rope_base: float
    n_rot: int


def read_gguf(path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and float32 weights of a llama-architecture GGUF file (numpy layout [out, in])."""
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(str(path))
    def field(name, default=None):
        f = reader.fields.get(name)
        if f is None:
            if default is None:
                raise teacher_io.TeacherError(f"{path}: no {name} in the GGUF metadata")
            return default
        return f.contents()
    arch = field("general.architecture")
    if arch != "llama":
        raise teacher_io.TeacherError(f"{path}: architecture {arch!r}; only llama is supported")
    weights = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))              # ggml ne -> numpy order
        weights[t.name] = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)).reshape(shape).astype(np.float32))
    n_vocab, d = weights["token_embd.weight"].shape
    n_head = int(field("llama.attention.head_count"))
    cfg = LlamaConfig(n_vocab, d, int(field("llama.block_count")), n_head, int(field("llama.attention.head_count_kv", n_head)),
                      int(field("llama.feed_forward_length")), float(field("llama.attention.layer_norm_rms_epsilon")),
                      float(field("llama.rope.freq_base", 10000.0)), int(field("llama.rope.dimension_count", d // n_head)))
    return cfg, weights


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor, base: float, n_rot: int) -> torch.Tensor:
    """llama.cpp's rope for llama (NORM mode): rotate adjacent pairs (x_2i, x_2i+1) by
    pos * base^(-2i / n_rot). x [B, T, H, hd], pos [T]."""
    half = n_rot // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) * 2 / n_rot)   # [half]
    angle = pos.float()[:, None] * freq                                                        # [T, half]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * dropout(x) A^T B^T, W frozen; A [r, in], B [out, r] (B starts at 0)."""

    def __init__(self, weight: torch.Tensor, r: int = 8, alpha: float = 16, dropout: float = 0.05):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        out_f, in_f = weight.shape
        self.lora_a = nn.Parameter(torch.empty(r, in_f))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(out_f, r))
        self.scale, self.dropout = alpha / r, nn.Dropout(dropout)

    def forward(self, x):
        return x @ self.weight.T + self.scale * (self.dropout(x) @ self.lora_a.T @ self.lora_b.T)

    def merged(self) -> torch.Tensor:
        return self.weight + self.scale * self.lora_b @ self.lora_a


class TorchLlama(nn.Module):
    """The LLaMA forward on GGUF weights; LoRA on attn_q and attn_v when r > 0."""

    def __init__(self, cfg: LlamaConfig, w: dict[str, torch.Tensor], r: int = 0, alpha: float = 16, dropout: float = 0.05):
        super().__init__()
        self.cfg, self.w = cfg, w
        self.lora = nn.ModuleDict()
        if r > 0:
            for i in range(cfg.n_layer):
                for name in ("attn_q", "attn_v"):
                    self.lora[f"{i}_{name}"] = LoRALinear(w[f"blk.{i}.{name}.weight"], r, alpha, dropout)

    def proj(self, x, i: int, name: str):
        key = f"{i}_{name}"
        return self.lora[key](x) if key in self.lora else x @ self.w[f"blk.{i}.{name}.weight"].T

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (causal, right padding is harmless) -> logits [B, T, n_vocab]."""
        c, w = self.cfg, self.w
        B, T = tokens.shape
        hd = c.d // c.n_head
        pos = torch.arange(T, device=tokens.device)
        x = w["token_embd.weight"][tokens]                                             # [B, T, d]
        for i in range(c.n_layer):
            h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], c.eps)
            q = rope(self.proj(h, i, "attn_q").view(B, T, c.n_head, hd), pos, c.rope_base, c.n_rot)
            k = rope(self.proj(h, i, "attn_k").view(B, T, c.n_kv, hd), pos, c.rope_base, c.n_rot)
            v = self.proj(h, i, "attn_v").view(B, T, c.n_kv, hd)
            rep = c.n_head // c.n_kv                                                   # grouped-query attention
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, c.d), i, "attn_output")
            h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], c.eps)
            x = x + self.proj(F.silu(self.proj(h, i, "ffn_gate")) * self.proj(h, i, "ffn_up"), i, "ffn_down")
        out = w.get("output.weight", w["token_embd.weight"])                           # tied when absent
        return rms_norm(x, w["output_norm.weight"], c.eps) @ out.T


def export_lora(model: TorchLlama, path, r: int, alpha: float) -> None:
    """Write the LoRA weights as a GGUF adapter: blk.N.attn_q.weight.lora_a [r, in],
    .lora_b [out, r]; llama.cpp scales B A by adapter.lora.alpha / r."""
    import gguf
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key, lora in model.lora.items():
        i, name = key.split("_", 1)
        w.add_tensor(f"blk.{i}.{name}.weight.lora_a", lora.lora_a.detach().float().numpy())
        w.add_tensor(f"blk.{i}.{name}.weight.lora_b", lora.lora_b.detach().float().numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tmp.replace(path)


# ============================================================================ training
def training_sequences(ds, model_path, rows: np.ndarray, chat: bool = False) -> list[list[int]]:
    """BIGRec samples from training rows: the teacher's prompt (tokenized as the teacher
    tokenizes it: prefix, then the row's part) + '"target title"' + end of sequence."""
    from llama_cpp import Llama
    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    prefix, suffix = teacher_io.prompt_template(ds.domain, teacher_io.read_chat_template(model_path) if chat else None)
    tok = lambda text, bos: vocab.tokenize(text.encode(), add_bos=bos, special=chat)
    head = tok(prefix, True)
    s = ds.train
    seqs = []
    for r in rows:
        rest = teacher_io.history_text([ds.titles[j] for j in s.hist[r, :s.lens[r]]]) + suffix
        seqs.append(head + tok(rest, False) + tok(f'"{ds.titles[s.target[r]]}"', False) + [vocab.token_eos()])
    return seqs


def lm_loss(model: TorchLlama, batch: list[list[int]], pad: int) -> torch.Tensor:
    """Mean next-token cross entropy over every real token (BIGRec trains on the whole prompt)."""
    T = max(map(len, batch))
    tokens = torch.tensor([s + [pad] * (T - len(s)) for s in batch])
    real = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in batch], dtype=torch.bool)
    logits = model(tokens[:, :-1])                                        # right padding: causal, harmless
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    mask = real[:, 1:].flatten()
    return (loss * mask).sum() / mask.sum()


def train_lora(ds, out, model_path=None, samples: int = 1024, epochs: int = 1, r: int = 8, alpha: float = 16,
               dropout: float = 0.05, lr: float = 1e-4, batch_size: int = 8, seed: int = 0, log=print) -> dict:
    """Fine-tune LoRA adapters on attn_q/attn_v with BIGRec's recipe; write the GGUF adapter."""
    import time
    model_path = Path(model_path) if model_path else teacher_io.default_model()
    torch.manual_seed(seed)
    rows = teacher_io.select_rows(len(ds.train), samples, seed)           # training rows only
    seqs = training_sequences(ds, model_path, rows)
    cfg, w = read_gguf(model_path)
    model = TorchLlama(cfg, w, r, alpha, dropout)
    opt = torch.optim.AdamW(model.lora.parameters(), lr=lr)
    pad = seqs[0][-1]
    t0, losses = time.perf_counter(), []
    g = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = g.permutation(len(seqs))
        for a in range(0, len(seqs), batch_size):
            loss = lm_loss(model, [seqs[i] for i in order[a:a + batch_size]], pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            log(f"  epoch {epoch + 1} step {len(losses)}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    export_lora(model, out, r, alpha)
    return {"model": str(model_path), "samples": len(seqs), "epochs": epochs, "r": r, "alpha": alpha, "lr": lr,
            "losses": losses, "seconds": time.perf_counter() - t0, "adapter": str(out)}

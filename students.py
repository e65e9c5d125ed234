"""The students in plain PyTorch (GRU4Rec, Hidasi et al. 2016; SASRec, Kang and McAuley 2018,
laid out as the official DLLM2Rec code; CL4SRec, Xie et al. 2022; Caser, Tang and Wang 2018, as
the official code's; DROS, Yang et al. 2023: SASRec + the DRO term, which the official code adds
to any backbone, and so does `<backbone>+dro` here), with DLLM2Rec's collaborative embedding
distillation as their input layer.

A student maps a right-padded history [B, L] to a state h [B, d]; its untied output layer
scores items. `score(h, items)` scores only the items asked for (the base loss and the
ranking distillation need a few per row), `score_all(h)` scores the whole catalogue
(evaluation, the student's top-K, the DRO term). The DRO term itself is part of the training
loss (dllm2rec.py): a name says only whether a student carries it (parse_student).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_student(name: str) -> tuple[str, bool]:
    """A student's name -> (backbone, with the DRO term): "dros" -> ("sasrec", True)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown student {name!r}; choose from {', '.join(CHOICES)}")
    backbone, with_dro = REGISTRY[name]
    return backbone.name, with_dro


class ItemEmbedding(nn.Module):
    """e_i = b_i + ed_weight * g(z_i): the paper's collaborative embedding distillation.

    b: learnable ID embedding, the "collaborative offset"; z_i: the teacher's embedding of
    item i's title (frozen); g: a learnable projection d_llm -> d. Without a teacher,
    e_i = b_i; with use_offset=False (the paper's "w/o offset" ablation), e_i = g(z_i), no
    ed_weight factor. Ids >= n_items
    (padding = n_items, the CL4SRec mask token = n_items + 1) have no teacher embedding;
    the padding id embeds to zero.
    """

    def __init__(self, n_items: int, dim: int, teacher_emb: torch.Tensor | None, ed_weight: float, use_offset: bool):
        super().__init__()
        self.n_items = n_items
        self.offset = nn.Embedding(n_items + 2, dim) if (use_offset or teacher_emb is None) else None
        if self.offset is not None:
            nn.init.normal_(self.offset.weight, std=0.01)  # small, so g(z) is not drowned out
        if teacher_emb is not None:
            if teacher_emb.shape[0] != n_items:
                raise ValueError(f"teacher embeddings cover {teacher_emb.shape[0]} items, data has {n_items}")
            z = torch.cat([teacher_emb.float(), teacher_emb.new_zeros(2, teacher_emb.shape[1]).float()])
            self.register_buffer("z", z, persistent=False)  # [n_items + 2, d_llm]
            self.g = nn.Linear(teacher_emb.shape[1], dim)
        else:
            self.z, self.g = None, None
        self.ed_weight = ed_weight
        self.static = False   # True: no data-dependent shapes (a captured training step)

    def forward(self, items: torch.Tensor) -> torch.Tensor:  # items [...] -> [..., d]
        # lookups by F.embedding: its backward sums repeated ids in a fixed order, where plain
        # indexing's accumulates them in a varying one (runs with one seed would differ)
        if self.g is None:
            e = F.embedding(items, self.offset.weight)               # b_i
        elif self.static:                                            # fixed shapes (a captured step)
            g_z = self.g(F.embedding(items, self.z))                 # g(z_i)
        else:
            distinct, inverse = items.unique(return_inverse=True)   # project each item once
            g_z = F.embedding(inverse, self.g(self.z[distinct]))    # g(z_i)
        if self.g is not None:
            e = g_z if self.offset is None else F.embedding(items, self.offset.weight) + self.ed_weight * g_z
        return e * (items != self.n_items).unsqueeze(-1)               # padding -> 0


class Student(nn.Module):
    """Shared parts: input embedding, dropout, untied output layer Linear(state, n_items)."""

    def __init__(self, n_items: int, *, dim: int, dropout: float, max_len: int, teacher_emb: torch.Tensor | None = None,
                 ed_weight: float = 0.0, use_offset: bool = True, state_dim: int | None = None):
        super().__init__()
        self.n_items, self.dim, self.max_len = n_items, dim, max_len
        self.embed = ItemEmbedding(n_items, dim, teacher_emb, ed_weight, use_offset)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(state_dim or dim, n_items)

    def encode(self, hist: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hist, lens):  # hist [B, L], lens [B] -> h [B, d]
        return self.encode(hist, lens)

    def score(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """h [B, d], items [B, m] -> scores [B, m], the same as score_all(h).gather(1, items)."""
        return torch.einsum("bd,bmd->bm", h, F.embedding(items, self.out.weight)) + F.embedding(items, self.out.bias[:, None])[..., 0]

    def score_all(self, h: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B, n_items]
        return self.out(h)

    def extra_loss(self, hist, lens, h, target) -> torch.Tensor | None:
        """The student's own term beside the BCE base loss and DRO (CL4SRec's); None for others."""
        return None


def last_real(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """x [B, L, d], lens [B] -> x at position lens-1 [B, d] (position 0 for empty histories)."""
    idx = (lens - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, x.shape[-1])
    return x.gather(1, idx).squeeze(1)


class GRU4Rec(Student):
    """Item embedding -> 1-layer GRU -> hidden state after the last real item."""
    name = "gru4rec"

    def __init__(self, n_items, **kw):
        super().__init__(n_items, **kw)
        self.gru = nn.GRU(self.dim, self.dim, batch_first=True)

    def encode(self, hist, lens):
        out, _ = self.gru(self.embed(hist))  # no dropout, as the official GRU; out[len-1] saw real items only
        return last_real(out, lens)


class SASRec(Student):
    """SASRec laid out as the official DROS/DLLM2Rec code: one block, one head, learned positions,
    causal and padding-masked attention whose residual is the NORMALISED query:
        x = dropout(e(items) + pos) * real;  q = LN_1(x);  a = Attention(q, x, x) + q
        u = LN_2(a);  f = LN_ff(dropout(W2 relu(W1 u)) + u);  h = LN_3(f) at the last real position.

    Only h at the last real position is used, and with one block it depends on the other
    positions through keys and values only; so the query side is computed at that position
    alone (`encode_all_positions` is the every-position version; the tests check that both
    agree, and that both equal a transcription of the official layout)."""
    name = "sasrec"

    def __init__(self, n_items, **kw):
        super().__init__(n_items, **kw)
        d = self.dim
        self.pos = nn.Embedding(self.max_len, d)
        self.ln_1, self.ln_2, self.ln_ff, self.ln_3 = (nn.LayerNorm(d) for _ in range(4))
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.w_1, self.w_2 = nn.Linear(d, d), nn.Linear(d, d)
        self.attn_dropout = kw["dropout"]

    def inputs(self, hist):
        """Item + position embeddings, dropout, padding zeroed: [B, L] -> [B, L, d], real [B, L]."""
        real = hist != self.n_items
        x = self.embed(hist) + self.pos.weight[:hist.shape[1]]
        return self.dropout(x) * real.unsqueeze(-1), real

    def block(self, x_q, x, mask):
        """One block for the queries x_q [B, Q, d] over keys/values x [B, L, d], mask [B, Q, L]."""
        q = self.ln_1(x_q)
        a = F.scaled_dot_product_attention(self.q(q), self.k(x), self.v(x), attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0) + q
        u = self.ln_2(a)
        f = self.ln_ff(self.dropout(self.w_2(F.relu(self.w_1(u)))) + u)
        return self.ln_3(f)

    def encode(self, hist, lens):
        x, real = self.inputs(hist)
        x_last = last_real(x, lens).unsqueeze(1)                                  # [B, 1, d]
        # the last real position sees every real item (right padding: positions < len);
        # an empty history sees its own (zero) position, so no softmax row is empty
        L = hist.shape[1]
        mask = torch.arange(L, device=hist.device) < lens.clamp(min=1).unsqueeze(1)  # [B, L]
        return self.block(x_last, x, mask.unsqueeze(1)).squeeze(1)                # [B, d]

    def encode_all_positions(self, hist, lens):
        """The same block run at every position with a causal, padding-masked attention."""
        x, real = self.inputs(hist)
        L = hist.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=hist.device).tril()
        mask = causal & (real.unsqueeze(1) | torch.eye(L, dtype=torch.bool, device=hist.device))
        return last_real(self.block(x, x, mask), lens)


# ----------------------------------------------------------------------------- Caser
# Caser's settings as the official code's (main.py argparse), written once
CASER_FILTER_SIZES, CASER_FILTERS = (2, 3, 4), 16


class Caser(Student):
    """Caser as the official code's: the embedded history (padding zeroed) as a 1-channel
    [L, d] image; horizontal convolutions Conv2d(1, F, (h, d)), h in CASER_FILTER_SIZES, ReLU,
    max over time -> [3F]; a vertical convolution Conv2d(1, 1, (L, 1)), ReLU -> [d];
    h = dropout(concat) [3F + d]. L is the full padded history (max_len); lens is not used."""
    name = "caser"

    def __init__(self, n_items, **kw):
        d, F_ = kw["dim"], CASER_FILTERS
        super().__init__(n_items, state_dim=d + F_ * len(CASER_FILTER_SIZES), **kw)
        self.horizontal = nn.ModuleList(nn.Conv2d(1, F_, (h, d)) for h in CASER_FILTER_SIZES)
        self.vertical = nn.Conv2d(1, 1, (self.max_len, 1))
        for conv in (*self.horizontal, self.vertical):
            nn.init.xavier_normal_(conv.weight)
            nn.init.constant_(conv.bias, 0.1)

    def encode(self, hist, lens):
        if hist.shape[1] != self.max_len:
            raise ValueError(f"Caser reads histories of exactly {self.max_len} ids, got {hist.shape[1]}")
        image = self.embed(hist).unsqueeze(1)                                   # [B, 1, L, d]
        pooled = [F.relu(conv(image)).squeeze(3).amax(dim=2) for conv in self.horizontal]   # each [B, F]
        vertical = F.relu(self.vertical(image)).flatten(1)                      # [B, d]
        return self.dropout(torch.cat([*pooled, vertical], dim=1))               # [B, 3F + d]


# ----------------------------------------------------------------------------- CL4SRec
# CL4SRec's settings (Xie et al., ICDE 2022), written once
CROP_ETA, MASK_GAMMA, REORDER_BETA, CL_WEIGHT, CL_TAU = 0.6, 0.3, 0.6, 0.1, 1.0


def augment_crop(hist, lens, pad: int, eta: float):
    """A random contiguous crop of floor(eta * len) items (at least 1), right-padded."""
    B, L = hist.shape
    keep = (eta * lens).floor().long().clamp(min=1).minimum(lens.clamp(min=1))
    start = (torch.rand(B, device=hist.device) * (lens - keep + 1).clamp(min=1)).long()
    pos = torch.arange(L, device=hist.device)
    src = (start.unsqueeze(1) + pos).clamp(max=L - 1)
    out = hist.gather(1, src)
    return torch.where(pos < keep.unsqueeze(1), out, torch.full_like(out, pad)), torch.where(lens > 0, keep, lens)


def augment_mask(hist, lens, mask_id: int, gamma: float):
    """Replace floor(gamma * len) randomly chosen real items by the mask token."""
    B, L = hist.shape
    pos = torch.arange(L, device=hist.device)
    real = pos < lens.unsqueeze(1)
    noise = torch.rand(B, L, device=hist.device).masked_fill(~real, 2.0)
    rank = noise.argsort(1).argsort(1)                      # rank of each position's noise
    hit = rank < (gamma * lens).floor().long().unsqueeze(1)
    return torch.where(hit, torch.full_like(hist, mask_id), hist), lens


def augment_reorder(hist, lens, beta: float):
    """Shuffle a random contiguous span of floor(beta * len) items."""
    B, L = hist.shape
    span = (beta * lens).floor().long()
    start = (torch.rand(B, device=hist.device) * (lens - span + 1).clamp(min=1)).long()
    pos = torch.arange(L, device=hist.device).expand(B, L).float()
    inside = (pos >= start.unsqueeze(1)) & (pos < (start + span).unsqueeze(1))
    # keys: outside the span its own position; inside a random point of [start, start+span)
    keys = torch.where(inside, start.unsqueeze(1) + torch.rand(B, L, device=hist.device) * span.unsqueeze(1).clamp(min=1) * 0.999, pos)
    return hist.gather(1, keys.argsort(1)), lens


def augment_pair(hist, lens, pad: int, mask_id: int):
    """Two views per row, made by two distinct methods out of crop, mask, reorder.
    Returns new tensors; the inputs are never modified."""
    views = [augment_crop(hist, lens, pad, CROP_ETA), augment_mask(hist, lens, mask_id, MASK_GAMMA),
             augment_reorder(hist, lens, REORDER_BETA)]
    B = hist.shape[0]
    first = torch.randint(0, 3, (B,), device=hist.device)
    second = (first + torch.randint(1, 3, (B,), device=hist.device)) % 3   # != first
    out = []
    for choice in (first, second):
        h = torch.stack([v[0] for v in views])[choice, torch.arange(B, device=hist.device)]
        n = torch.stack([v[1] for v in views])[choice, torch.arange(B, device=hist.device)]
        out.append((h, n))
    return out


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over 2N views: view i's positive is its twin, the other 2N-2 are negatives."""
    z = torch.cat([z1, z2])                                   # [2N, d]
    sim = z @ z.T / tau                                       # [2N, 2N]
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    twin = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(0, n, device=z.device)])
    return F.cross_entropy(sim, twin)


class CL4SRec(SASRec):
    """SASRec + cl_weight * InfoNCE between two augmented views of each history."""
    name = "cl4srec"

    def __init__(self, n_items, **kw):
        super().__init__(n_items, **kw)
        self.cl_weight, self.tau = CL_WEIGHT, CL_TAU

    def extra_loss(self, hist, lens, h, target):
        (h1, l1), (h2, l2) = augment_pair(hist, lens, self.n_items, self.n_items + 1)
        z1, z2 = self.encode(torch.cat([h1, h2]), torch.cat([l1, l2])).chunk(2)  # both views in one pass
        return self.cl_weight * info_nce(z1, z2, self.tau)


# ============================================================================ the one registry
# every name a student goes by -> (its backbone class, whether it carries the DRO term); "dros" is
# the paper's name for SASRec with it, "<backbone>+dro" any other backbone with it
REGISTRY = {"gru4rec": (GRU4Rec, False), "sasrec": (SASRec, False), "cl4srec": (CL4SRec, False),
            "dros": (SASRec, True), "caser": (Caser, False),
            "gru4rec+dro": (GRU4Rec, True), "cl4srec+dro": (CL4SRec, True), "caser+dro": (Caser, True)}
CHOICES = tuple(REGISTRY)
STUDENTS = tuple(n for n in REGISTRY if not n.endswith("+dro"))      # the five students of the tables


def make_student(name: str, n_items: int, **kw) -> Student:
    """name: one of CHOICES (its backbone; the DRO term is the training loss's); kw: dim,
    dropout, max_len, teacher_emb, ed_weight, use_offset (see Student)."""
    parse_student(name)
    return REGISTRY[name][0](n_items, **kw)

"""One optimisation step of a student (forward, backward, Adam), in one of three modes:

- "eager": the reference, and the CPU's step;
- "compiled": the same function through torch.compile (inductor, or aot_eager to trace
  without generating code);
- "captured" (CUDA): the step recorded once as a CUDA graph and replayed, one launch a step
  instead of a few hundred.

Compiled and captured steps are static: fixed shapes and no host synchronisation, so the
training loss samples negatives with its static sampler and the input layer projects every
looked-up item (students.ItemEmbedding.static).
"""
from __future__ import annotations

import torch


def captured(device) -> bool:
    """Whether training on this device uses the captured step (CUDA): full batches only and the
    static negative sampler, so other runs than the eager step's (CPU) of the same settings."""
    return torch.device(device).type == "cuda"


class Step:
    """step(*batch) -> the loss of loss_fn(model, cfg, *batch, static=...) before the update.
    The captured mode runs its first `warmup` steps eagerly on a side stream (at least one, so
    that Adam's lazily created state is not captured), captures the next, and replays it from
    then on with the batch copied into static buffers. Streams and graph live on the model's
    device (cuda:1 too)."""

    def __init__(self, loss_fn, model, opt, cfg, mode: str = "eager", static: bool | None = None,
                 warmup: int = 3, backend: str = "inductor"):
        self.loss_fn, self.model, self.opt, self.cfg, self.mode = loss_fn, model, opt, cfg, mode
        self.warmup = max(1, warmup) if mode == "captured" else warmup
        self.static = mode != "eager" if static is None else static
        model.embed.static = self.static                  # no data-dependent shapes in the input layer
        self.run = torch.compile(self.eager, backend=backend) if mode == "compiled" else self.eager
        self.done, self.graph, self.inputs, self.loss = 0, None, None, None

    def eager(self, *batch) -> torch.Tensor:
        loss = self.loss_fn(self.model, self.cfg, *batch, static=self.static)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, *batch) -> torch.Tensor:
        self.done += 1
        if self.mode != "captured":
            return self.run(*batch)
        with torch.cuda.device(next(self.model.parameters()).device):   # streams and graph on the model's GPU
            return self.captured(*batch)

    def captured(self, *batch) -> torch.Tensor:
        if self.done <= self.warmup:                  # warm up off the default stream, as capture needs
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.eager(*batch)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.inputs = [x.clone() for x in batch]
            self.graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.loss = self.loss_fn(self.model, self.cfg, *self.inputs, static=True)
                self.loss.backward()
                self.opt.step()
        else:
            for buf, x in zip(self.inputs, batch):
                buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.loss.detach().clone()

"""One optimiser step's forward and backward, with gradient accumulation that keeps the contrastive loss.

Splitting a contrastive batch into micro-batches and summing their losses would change the loss: each image
would be compared with its own micro-batch's texts only. Instead (a feature cache, as in GradCache):
1. a no-grad pass computes the features of every micro-batch;
2. each micro-batch is recomputed with gradient and put back among the cached features of the others, and the
   loss over the whole batch is back-propagated. The gradient reaching micro-batch k's features is exactly its
   share of the full-batch gradient, so the sum over micro-batches equals the large-batch gradient.
The logit scale and bias take part in every pass; their gradient is kept from one pass only (the last, which is
also the one where DDP synchronises), or it would be counted once per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from clipforge.loss import contrastive_loss

Backward = Callable[[torch.Tensor], None]
Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # a tower's input: images, token ids, or trunk outputs


def to_device(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, tuple):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def _chunks(x: Inputs, n: int) -> list[Inputs]:
    """n micro-batches along dim 0; a tuple is split member by member."""
    if isinstance(x, tuple):
        return list(zip(*(t.chunk(n) for t in x)))
    return list(x.chunk(n))


def _no_sync(model: torch.nn.Module, last: bool):
    # Under DDP, gradients are all-reduced once, after the last micro-batch.
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def forward_backward(
    model: torch.nn.Module,
    images: Inputs,
    tokens: Inputs,
    *,
    loss: str = "clip",
    local_loss: bool = False,
    accum_steps: int = 1,
    autocast: contextlib.AbstractContextManager | None = None,
    backward: Backward | None = None,
) -> torch.Tensor:
    """Accumulate into .grad the gradient of the loss on this rank's batch (images (B, 3, H, W), tokens (B, T),
    or a locked tower's trunk outputs) and return the loss (detached). `model` is a CLIP or a LockedCLIP, or a
    DDP / compiled wrapper of one."""
    amp = autocast if autocast is not None else contextlib.nullcontext()
    backward = backward or (lambda t: t.backward())

    def loss_of(img, txt, scale, bias):
        return contrastive_loss(loss, img, txt, scale, bias, local=local_loss)

    if accum_steps == 1:
        with amp:
            out = model(images, tokens)
        value = loss_of(*out)
        backward(value)
        return value.detach()

    image_chunks, token_chunks = _chunks(images, accum_steps), _chunks(tokens, accum_steps)
    with torch.no_grad(), amp:
        cached = [model(i, t) for i, t in zip(image_chunks, token_chunks)]
    cache_img = [c.image_features for c in cached]  # accum x (b, D)
    cache_txt = [c.text_features for c in cached]
    for k in range(accum_steps):
        last = k == accum_steps - 1
        with _no_sync(model, last):
            with amp:
                out = model(image_chunks[k], token_chunks[k])
            img = torch.cat([*cache_img[:k], out.image_features, *cache_img[k + 1 :]])  # (B, D)
            txt = torch.cat([*cache_txt[:k], out.text_features, *cache_txt[k + 1 :]])
            scale, bias = out.logit_scale, out.logit_bias
            if not last:
                scale = scale.detach()
                bias = bias.detach() if bias is not None else None
            value = loss_of(img, txt, scale, bias)
            backward(value)
    return value.detach()

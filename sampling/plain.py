"""Plain sampling over any discrete order (gpt-fast's pattern): one forward pass per step.

    for each step s of the order:
        inputs of step s --extend--> hidden states --head--> the step's tokens (B, G)

Both halves of a guided batch are fed the same (guided) tokens. Noise comes from
`sampling.noise`, keyed by each image's global index and each element's sequence index, so an
image does not depend on the batch it was generated in or on the number of processes.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from sampling import noise
from sampling.context import SamplingContext


@torch.no_grad()
def plain_loop(ctx: SamplingContext) -> torch.Tensor:
    """Code grids (B, h, w) for the context's conditions."""
    model = ctx.model
    order, inputs, R = model.order, model.inputs, len(ctx.rows)
    keys = ctx.keys()
    elements = torch.arange(order.num_tokens, device=ctx.device)  # noise counters: sequence indices
    # every row's tokens; the unconditional CFG rows are fed the same (guided) tokens
    seq = torch.zeros(R, order.num_tokens, dtype=torch.long, device=ctx.device)  # (R, N)
    h = ctx.h
    for s in tqdm(range(order.num_steps), desc="steps", leave=False, disable=not ctx.progress):
        fed = inputs.step(model, s, seq, ctx.vector, R)
        if fed is not None:
            h = ctx.extend_fn(model, *fed, ctx.ada)  # (R, T, D)
        lo, hi = order.span(s)
        uniform = noise.uniform_elements(keys, elements[lo:hi], model.head.vocab_size)
        tokens = model.head.draw(inputs.draw_states(h, hi - lo), ctx.scale(s), ctx.settings, uniform)  # (B, G)
        seq[:, lo:hi] = tokens.repeat(ctx.copies, 1)
    return order.to_grid(seq[:len(ctx.cond)])

"""Prediction heads. A head owns its training loss and its draw of one step's tokens (MAR's
DiffLoss pattern), so the backbone never knows whether it predicts codebook indices, groups of
tokens or continuous latents. A head is built from its own config (a section of the model
config, e.g. `model.token_head`) and initialises its own output layer.

Interface:
    head.continuous                              False: codebook indices; True: latents
    Head.output_size(spec)                       its output width: codebook size | latent channels
    head.training_pair(seq, step_of, draws) -> (inputs, target, t)
        what the model is fed and must predict for a clean sequence: the codes themselves
        (token), or noisy latents, their velocity and each step's t (flow)
    head.loss(h, target) -> (loss, metrics)      h (B, N, D) hidden states, target (B, N);
                                                 metrics a free-form dict of scalars
    head.draw(h, cfg_scale, settings, uniform) -> tokens (B, G)
        h (B, G, D), or (2B, G, D) with the conditional rows first when cfg_scale is not None;
        `uniform` (B, G, V) is the step's noise in (0, 1)
    head.probs(h, cfg_scale, settings) -> (B, G, V), the distribution `draw` samples from
The flow head has no `draw`: `sampling/flow.py` integrates its `velocity(h)`.
"""

from __future__ import annotations

from ar.heads.flow import FlowHead, FlowHeadConfig
from ar.heads.token import TokenHead, TokenHeadConfig

# name -> (head class, the ModelConfig field holding its config)
HEADS = {"token": (TokenHead, "token_head"), "flow": (FlowHead, "flow_head")}

__all__ = ["HEADS", "FlowHead", "FlowHeadConfig", "TokenHead", "TokenHeadConfig"]

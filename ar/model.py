"""The generator: condition + order + inputs + transformer backbone + head.

    codes (B, h, w) --order--> sequence (B, N) --inputs--> [condition prefix (B, P, D); inputs]
        --transformer (block-causal mask)--> hidden states predicting each element --head-->
        loss | one step's tokens

`ARModel.forward` is the training path: the head says what the model is fed and must predict
(`head.training_pair`: the codes themselves, or noisy latents and their velocity for flow).
Inference: `prefill(condition)` writes the prefix into the static KV cache set up by
`setup_cache`, then `extend(x, positions, ada)` feeds T inputs at T positions against it; the
cache is the model's only mutable inference state. The samplers in `sampling/` (one context,
`sampling/context.py`, a loop each) drive them step by step. Cached decoding equals a full
forward pass for every order (tested).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ar.conditioning import Condition, spec_entry
from ar.config import GeneratorSpec, input_kind, transformer_args
from ar.heads import HEADS
from ar.inputs import INPUTS
from ar.orders import CPU, make_order
from ar.transformer import Transformer, rope_2d

##################################################################################
#                                   Model                                        #
##################################################################################


class ARModel(nn.Module):
    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        self.spec = spec
        m = spec.model
        head, config_field = HEADS[m.head]
        self.order = make_order(m.order, spec.grid_h, spec.grid_w, spec.multiscale.patch_nums)
        self.num_tokens = self.order.num_tokens
        a = transformer_args(m)
        # built in this order (cond, tok_embeddings, cond_add, ...): their random initial
        # values are drawn in it
        self.cond = spec_entry(spec)(spec, a.dim)  # the condition's embedder (ar/conditioning)
        self.prefix = self.cond.num_tokens  # condition positions P before the sequence
        inputs = INPUTS[input_kind(m)]
        # token inputs are codebook embeddings; flow and next-scale inputs project their own
        self.tok_embeddings = nn.Embedding(spec.vocab_size, a.dim) if inputs.token_table else None
        self.cond_add = self.cond.input_table()  # a vector of the condition on every input, or None
        inputs = inputs(self.order, self.prefix, a.dim, spec)
        self.length = self.prefix + inputs.length  # sequence positions L, prefix included
        self.pos_embed = (nn.Parameter(torch.zeros(self.length, a.dim))
                          if m.pos_embed == "learned" else None)  # (L, D), by sequence position
        self.token_dropout = nn.Dropout(m.token_dropout)
        self.inputs = inputs
        self.level_embed = nn.Embedding(self.order.num_steps, a.dim) if m.level_embed else None
        self.register_buffer("levels", self._levels(), persistent=False)
        self.transformer = Transformer(replace(a, capacity=self.length))
        self.head = head(a.dim, head.output_size(spec), getattr(m, config_field))
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.initialize_weights()

    def _rope_table(self) -> torch.Tensor | None:
        """(P + N, Dh/2, 2): condition positions first, then the sequence's grid positions
        (position P + i holds element i's input, or token i for next-token); None without RoPE."""
        if self.spec.model.rope == "none":
            return None
        rows, cols = self.inputs.coords()
        table = rope_2d(rows, cols, self.transformer.args.head_dim, self.spec.model.rope_base)
        cond = torch.zeros(self.prefix, *table.shape[1:], device=table.device)
        if self.spec.model.cond_rope == "identity":
            cond[..., 0] = 1.0  # cos 1, sin 0: no rotation
        return torch.cat([cond, table])

    def _levels(self) -> torch.Tensor:
        """(P + N,): the step each position predicts (0 where it predicts nothing), which picks
        its level embedding."""
        levels = torch.zeros(self.length, dtype=torch.long, device=CPU)
        levels[self.inputs.out_positions.cpu()] = self.order.step_of
        return levels

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers, e.g. after building on the meta device."""
        rope = self._rope_table()
        self.rope = None if rope is None else rope.to(device)
        self.levels = self._levels().to(device)

    def initialize_weights(self) -> None:
        # LlamaGen/GPT-2 style: N(0, 0.02) for every matrix and table ...
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for table in (self.pos_embed, self.transformer.mid_pos):
            if table is not None:
                nn.init.normal_(table, std=0.02)
        modulations = [layer.modulation for layer in self.transformer.layers]
        for mod in modulations + [self.transformer.final_modulation]:
            if mod is not None:  # adaLN-zero (DiT): blocks start as identity, the final norm plain
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)
        for part in (self.inputs, self.cond):
            part.initialize()
        self.head.initialize()  # ... and the head its own output layer (zero: uniform predictions)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.layers[0].attention.wqkv.weight.dtype

    def condition(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prefix embeddings (B, P, D), the vector added to every input (B, 1, D) or None)."""
        return self.cond(cond), self.cond.input_vector(cond, self.cond_add)

    def embed_tokens(self, tokens: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        """Token inputs (B, n) -> (B, n, D), plus the condition's vector when there is one."""
        x = self.tok_embeddings(tokens)
        return x if vector is None else x + vector

    def _with_pos(self, x: torch.Tensor, pos: torch.Tensor | slice) -> torch.Tensor:
        """Inputs plus the learned position and level embeddings of their positions."""
        if self.pos_embed is not None:
            x = x + self.pos_embed[pos].to(x.dtype)
        if self.level_embed is not None:
            x = x + self.level_embed(self.levels[pos]).to(x.dtype)
        return x

    def _rope_at(self, pos: torch.Tensor | slice) -> torch.Tensor | None:
        return None if self.rope is None else self.rope[pos]

    def attention_mask(self, query_positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """The block rule as a boolean "may attend" mask (T, L) for queries at the given
        positions (T,), or (B, T, L) for per-row positions (B, T), (all L when None); None where
        it is plain causal attention (SDPA's fast path)."""
        blocks = self.inputs.blocks  # (L,)
        if query_positions is None:
            return None if self.inputs.causal else blocks[None, :] <= blocks[:, None]
        return blocks <= blocks[query_positions][..., None]

    # ------------------------------------------------------------------ training

    def forward(self, data: torch.Tensor, cond: Condition, draws=None) -> dict:
        """data: codes (B, h, w) or (B, N), or latents (B, C, h, w); cond with the null for
        dropped conditions; draws: the flow head's (t, eps) instead of random ones (tests)."""
        seq = self.order.to_sequence(data)  # (B, N) codes or (B, N, C) latents
        inputs, target, t = self.head.training_pair(seq, self.order.step_of, draws)
        h = self.states(inputs, cond, t)  # (B, L, D)
        loss, metrics = self.head.loss(self.inputs.predictions(h), target)
        if self.cond.loss_weight:  # unified text sequences: the caption's own tokens
            text_loss = self.cond.loss(h[:, :self.prefix], cond)
            loss, metrics = loss + self.cond.loss_weight * text_loss, {**metrics, "text_loss": text_loss.detach()}
        return {"loss": loss, **metrics}

    def hidden(self, seq: torch.Tensor, cond: Condition,
               t: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced hidden states (B, N, D): row i predicts sequence element i; t (B, S)
        is each step's flow time (flow inputs)."""
        return self.inputs.predictions(self.states(seq, cond, t))

    def states(self, seq: torch.Tensor, cond: Condition, t: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's output at every position (B, L, D), prefix included."""
        prefix, vector = self.condition(cond)
        x = torch.cat([prefix, self.inputs.teacher_forced(self, seq, vector)], dim=1)  # (B, L, D)
        x = self.token_dropout(self._with_pos(x, slice(0, x.shape[1])))
        return self.transformer(x, self._rope_at(slice(0, x.shape[1])), self.attention_mask(),
                                ada=self.modulation(cond, t))  # (B, L, D)

    def modulation(self, cond: Condition, t: torch.Tensor | None = None):
        """adaLN input for a whole sequence: None without adaLN; the class vector for every
        position; with flow times t (B, S), one vector per step, the prefix getting t = 0."""
        if t is None:
            vectors = self.ada_vectors(cond)
            return None if vectors is None else (vectors, None)
        t = torch.cat([t.new_zeros(t.shape[0], 1), t], dim=1)  # (B, 1 + S): row 0 the prefix's
        return self.ada_vectors(cond, t), self.inputs.blocks + 1

    def ada_vectors(self, cond: Condition, t: torch.Tensor | None = None):
        """The distinct adaLN vectors of positions fed together: (B, 1, D) from the class, or
        (B, S', D) with flow times t (B, S'); None without adaLN."""
        if self.cond.vector_table is None:
            return None
        vector = self.cond.vector(cond)  # (B, 1, D)
        return vector if t is None else self.inputs.time_vectors(vector, t)

    # ----------------------------------------------------------------- inference

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        self.transformer.setup_cache(batch, self.length, dtype or self.dtype, self.levels.device)

    def clear_cache(self) -> None:
        self.transformer.clear_cache()

    def extend(self, x: torch.Tensor, positions: torch.Tensor, ada=None) -> torch.Tensor:
        """Feed inputs x (B, T, D) at sequence positions (T,), or (B, T) when rows are at
        different positions, against the KV cache; returns their hidden states (B, T, D).
        Positions stay on the device: no host sync. ada: the adaLN input (vectors (B, S, D),
        index (T,) | None) of adaLN models."""
        x = self._with_pos(x, positions)
        return self.transformer(x, self._rope_at(positions), self.attention_mask(positions),
                                positions, ada)

    def prefill(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the condition prefix into the cache; returns its hidden states (B, P, D) and
        the condition's vector for the inputs that follow (None without a vector on every input)."""
        prefix, vector = self.condition(cond)
        return self.write_prefix(prefix, cond), vector

    def write_prefix(self, prefix: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Feed the condition's prefix embeddings (B, P, D) into the cache; their hidden states."""
        if self.prefix == 0:
            return prefix
        # flow models see the prefix as clean context (t = 0), as in training
        t = prefix.new_zeros(len(cond), 1) if self.inputs.timed else None
        vectors = self.ada_vectors(cond, t)
        ada = None if vectors is None else (vectors, None)
        return self.extend(prefix, torch.arange(self.prefix, device=prefix.device), ada)

    def timed_inputs(self, groups: list, vector: torch.Tensor | None, cond: Condition):
        """What `extend` takes to feed groups of latents at their flow times (timed inputs):
        groups [(latents (R, G_i, C), positions (G_i,), t float)] -> (inputs (R, T, D),
        positions (T,), the adaLN input: a vector per group and each position's group)."""
        x = torch.cat([self.inputs.embed(latents, vector) for latents, _, _ in groups], dim=1)
        positions = torch.cat([p for _, p, _ in groups])
        R = x.shape[0]
        times = torch.cat([torch.full((R, 1), t, dtype=torch.float64, device=x.device)
                           for _, _, t in groups], dim=1)  # (R, groups)
        index = None
        if len(groups) > 1:  # (T,): which group's vector each position reads
            sizes = torch.tensor([len(p) for _, p, _ in groups], device=x.device)
            index = torch.repeat_interleave(torch.arange(len(groups), device=x.device), sizes)
        return x, positions, (self.ada_vectors(cond, times), index)

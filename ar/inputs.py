"""What the transformer sees at each step's positions, and where each step's predictions come
from: the seam the next-X methods plug into.

The sequence is [condition prefix (P positions)] + the inputs' positions. An inputs kind says
  - `length`: how many positions follow the prefix,
  - `out_positions` (N,): the position whose hidden state predicts sequence element i,
  - `blocks` (P + length,): the attention block of every position. One rule, for training and
    for the KV cache alike: a position attends to every position of a block <= its own
    (block-causal, inclusive of its own block, whose inputs are all known at once),
  - `teacher_forced(model, seq, vector)`: the inputs of a whole sequence (training),
  - `step(model, s, seq, vector, rows)`: the inputs that produce step s's predictions while
    generating, at their positions (None when the prefill already produced them); `seq` (R, N)
    holds the tokens of every row, steps < s filled in,
  - discrete inputs also `elements(model, elements, seq, vector, prefix)`: the inputs that
    predict the given elements (R, T), each row its own (speculative decoding's window), at
    their positions (R, T); `prefix` (R, P, D) is the condition prefix.
`vector` is the condition's per-row vector added to every input (`model.cond_add`) or None.

    next_token   the previous token (LlamaGen): position P + i holds token i and predicts
                 token i + 1; token 0 is predicted by the last prefix position. Steps of one.
    next_group   discrete next-X: element i of step s sees the token at the same index of step
                 s - 1 (learned start embeddings for step 0) and predicts its own token; a whole
                 step is fed, and predicted, at once
    shuffle      Token-Shuffle: each step's G tokens (a k x k cell: s = k) are fused into one
                 position (ar/shuffle.py), which predicts the next step's G tokens through the
                 unshuffle; step 0 is predicted by the last prefix position. Plain causal over
                 S = N / G positions; with steps of one (raster) it is next_token exactly
    flow         continuous next-X (xAR): element i sees its own noisy latent x_t through a
                 Linear and predicts its velocity; the step's t enters through the adaLN
                 vector (`time_vectors`). Block-causal inclusive, as next_group. In training
                 every step has its own t (noisy context); in sampling the finished previous
                 step is fed again clean (t = 0) so that the KV cache holds clean context.
Next-scale inputs implement the same. Every kind also says where the predictions are read
(`predictions`, `draw_states`) and the grid coordinates of its positions for RoPE (`coords`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ar.timestep import TimestepEmbedder
from ar.orders import CPU, Order  # buffers are built on the CPU, even under a meta device
from ar.shuffle import TokenFuse, TokenUnshuffle
from common.config import ConfigError
from tokenizer.msvq import MSVQConfig, MultiScaleQuantizer


@dataclass
class InputsConfig:
    name: str = "auto"  # next_token | next_group | flow | next_scale | shuffle (Token-Shuffle: a step's tokens fused into one position; order cell with cell=s fuses s x s) | auto (flow for the flow head; next_scale for order scale; else next_token for raster, next_group otherwise)
    shuffle_blocks: int = 2  # shuffle: residual MLP blocks after fusing and before unshuffling (Token-Shuffle's n)

    def validate(self) -> None:
        if self.name != "auto" and self.name not in INPUTS:
            raise ConfigError(f"model.inputs.name={self.name!r}; choose one of {['auto', *INPUTS]}")
        if self.shuffle_blocks < 0:
            raise ConfigError(f"model.inputs.shuffle_blocks={self.shuffle_blocks} must be >= 0")


def _block_causal(blocks: torch.Tensor) -> bool:
    """Whether the block rule is plain causal attention (every position its own block)."""
    return bool((blocks[1:] > blocks[:-1]).all())


class _Inputs(nn.Module):
    """What every kind shares: where the predictions of the sequence's elements are read.

    What shared code asks a kind, declared rather than probed:
        tokenizer_kind   the tokenizer (and code cache) it trains on: discrete | multiscale |
                         continuous ("discrete" inputs are the codebook embeddings of tokens,
                         model.tok_embeddings; the others project their own)
        timed            each fed group's flow time enters its adaLN vector
        integrates       a step's tokens are integrated by many network calls (flow), not drawn
        supports_window  `elements` feeds any window of elements per row at once (speculative
                         decoding verifies drafted windows with it)
        prefill_predicts_first  step 0 is predicted by the prefill itself (no pass of its own)
        token_table      its inputs are the codebook embeddings of tokens (model.tok_embeddings)
    and `prepare_training(spec)` fetches what a new model needs from outside its weights (the
    next-scale inputs: the tokenizer's quantiser).
    """

    timed = False
    integrates = False
    supports_window = False
    prefill_predicts_first = False
    token_table = False

    def initialize(self) -> None:
        """Initialise own parameters beyond the model's N(0, 0.02) (none by default)."""

    def prepare_training(self, spec) -> None:
        """Anything a new model needs from outside its weights before training (none by default)."""

    def predictions(self, h: torch.Tensor) -> torch.Tensor:
        """The states predicting each sequence element (B, N, D) from all positions' (B, L, D)."""
        return h[:, self.out_positions]

    def draw_states(self, h: torch.Tensor, size: int) -> torch.Tensor:
        """The states that draw a step of `size` elements from the output of the extend (or
        prefill) that fed its inputs (R, T, D): its last `size` positions."""
        return h[:, h.shape[1] - size:]

    def coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid (rows, cols) of the input at position P + i, for i = 0 .. at least length - 1."""
        return self.order.coords()


class NextTokenInputs(_Inputs):
    kind = "next_token"
    tokenizer_kind = "discrete"
    token_table = True
    supports_window = True
    prefill_predicts_first = True

    def __init__(self, order: Order, prefix: int, dim: int, spec=None):
        super().__init__()
        if order.step_sizes != [1] * order.num_tokens:
            raise ValueError(f"model.inputs.name=next_token needs one token per step; order {order} "
                             f"has groups: use model.inputs.name=next_group")
        self.order, self.prefix = order, prefix
        self.length = order.num_tokens - 1  # the last token is never an input
        self.register_buffer("out_positions", torch.arange(order.num_tokens, device=CPU) + prefix - 1,
                             persistent=False)
        self.register_buffer("blocks", torch.arange(prefix + self.length, device=CPU), persistent=False)
        self.causal = True

    def teacher_forced(self, model, seq: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        return model.embed_tokens(seq[:, :-1], vector)  # (B, N - 1, D)

    def step(self, model, s: int, seq: torch.Tensor, vector: torch.Tensor | None, rows: int):
        if s == 0:
            return None  # the prefill's last position predicts token 0
        pos = self.out_positions[s:s + 1]  # where token s - 1 goes in: P + s - 1
        return model.embed_tokens(seq[:, s - 1:s], vector), pos

    def elements(self, model, elements: torch.Tensor, seq: torch.Tensor, vector, prefix: torch.Tensor):
        # token e - 1 predicts token e; token 0 is predicted by the last prefix position, whose
        # input (the prefix's last embedding) is fed again: same input and context, same K/V
        x = model.embed_tokens(seq.gather(1, (elements - 1).clamp(min=0)), vector)
        x = torch.where((elements == 0)[..., None], prefix[:, -1:].to(x.dtype), x)
        return x, self.out_positions[elements]


class _OwnStepInputs(_Inputs):
    """Position P + i holds an input for sequence element i and predicts it; a step's
    positions form one attention block, the prefix a block before every step."""

    def __init__(self, order: Order, prefix: int):
        super().__init__()
        self.order, self.prefix = order, prefix
        self.length = order.num_tokens
        self.register_buffer("out_positions", torch.arange(order.num_tokens, device=CPU) + prefix,
                             persistent=False)
        blocks = torch.cat([torch.full((prefix,), -1, device=CPU), order.step_of])
        self.register_buffer("blocks", blocks, persistent=False)
        self.causal = _block_causal(blocks)


class NextGroupInputs(_OwnStepInputs):
    kind = "next_group"
    tokenizer_kind = "discrete"
    token_table = True
    supports_window = True

    def __init__(self, order: Order, prefix: int, dim: int, spec=None):
        super().__init__(order, prefix)
        group = order.group_size  # equal steps: element j of step s sees element j of step s - 1
        self.start = nn.Parameter(torch.zeros(group, dim))  # (G, D) the inputs of step 0
        self.group = group

    def initialize(self) -> None:
        nn.init.normal_(self.start, std=0.02)

    def _start(self, rows: int, dtype: torch.dtype, vector: torch.Tensor | None) -> torch.Tensor:
        """Step 0's inputs (rows, G, D): the start embeddings, plus the condition's vector."""
        x = self.start.to(dtype).expand(rows, -1, -1)
        return x if vector is None else x + vector

    def teacher_forced(self, model, seq: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        # equal steps: element i of steps >= 1 sees sequence element i - G
        later = model.embed_tokens(seq[:, :-self.group], vector)  # (B, N - G, D)
        return torch.cat([self._start(seq.shape[0], later.dtype, vector), later], dim=1)  # (B, N, D)

    def step(self, model, s: int, seq: torch.Tensor, vector: torch.Tensor | None, rows: int):
        lo, hi = self.order.span(s)
        pos = self.out_positions[lo:hi]  # (G,)
        if s == 0:
            return self._start(rows, model.dtype, vector), pos
        return model.embed_tokens(seq[:, lo - self.group:lo], vector), pos

    def elements(self, model, elements: torch.Tensor, seq: torch.Tensor, vector, prefix: torch.Tensor):
        x = model.embed_tokens(seq.gather(1, (elements - self.group).clamp(min=0)), vector)
        start = self._start(len(seq), x.dtype, vector)  # (R, G, D)
        first = start.gather(1, (elements % self.group)[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.where((elements < self.group)[..., None], first, x)
        return x, self.out_positions[elements]


class FlowInputs(_OwnStepInputs):
    kind = "flow"
    timed = True
    integrates = True
    tokenizer_kind = "continuous"

    def __init__(self, order: Order, prefix: int, dim: int, spec=None):
        super().__init__(order, prefix)
        self.proj = nn.Linear(spec.latent_channels, dim)  # (C -> D) xAR's z_proj
        self.time_embed = TimestepEmbedder(dim)

    def embed(self, latents: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        """Latents (B, n, C) -> (B, n, D), plus the condition's vector when there is one."""
        x = self.proj(latents.to(self.proj.weight.dtype))
        return x if vector is None else x + vector

    def teacher_forced(self, model, seq: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        return self.embed(seq, vector)  # seq: the noisy latents x_t (B, N, C)

    def time_vectors(self, class_vector: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """adaLN vectors (B, S, D): the class vector (B, 1, D) plus the embedding of each t
        (B, S) (one per step, or per fed group while sampling)."""
        return class_vector + self.time_embed(t).to(class_vector.dtype)


class NextScaleInputs(_Inputs):
    kind = "next_scale"
    tokenizer_kind = "multiscale"
    prefill_predicts_first = True

    def __init__(self, order: Order, prefix: int, dim: int, spec=None):
        super().__init__()
        scales = order.scales
        if scales is None:
            raise ValueError(f"model.inputs.name=next_scale needs model.order.name=scale, not {order.name}")
        first = order.step_sizes[0]
        if prefix != first:
            raise ValueError(f"model.inputs.name=next_scale: the prefix is the first scale's input "
                             f"(VAR's start token), so model.class_condition.tokens must be {first} "
                             f"(= {scales[0]}^2), not {prefix}")
        self.order, self.prefix = order, prefix
        self.length = order.num_tokens - first  # inputs of scales 1..S-1
        # position i predicts element i: the prefix predicts scale 0, the inputs the rest
        self.register_buffer("out_positions", torch.arange(order.num_tokens, device=CPU), persistent=False)
        self.register_buffer("blocks", order.step_of.clone(), persistent=False)  # a block per scale
        self.causal = _block_causal(self.blocks)
        q = spec.multiscale
        self.quantizer = MultiScaleQuantizer(MSVQConfig(
            codebook_size=spec.vocab_size, codebook_dim=q.code_dim, patch_nums=list(scales),
            quant_resi=q.quant_resi, share_quant_resi=q.share_quant_resi)).requires_grad_(False)
        self.word_embed = nn.Linear(q.code_dim, dim)  # (Cvae -> D) VAR's word_embed

    def load_quantizer(self, tokenizer) -> None:
        """Copy the multi-scale tokenizer's codebook and phi convolutions (frozen)."""
        self.quantizer.load_state_dict(tokenizer.quantize.state_dict(), strict=True)

    def prepare_training(self, spec) -> None:
        """The inputs are rebuilt with the tokenizer's quantiser: copy it (frozen) from the
        tokenizer file the cache was encoded with (then it is saved with the weights)."""
        from tokenizer import load_tokenizer, tokenizer_sha256

        path = Path(spec.tokenizer_path)
        why = "next-scale training rebuilds its inputs with that tokenizer's quantiser"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} (recorded in data.codes's meta.json) not found; "
                                    f"{why}: put the file back, or re-encode the cache")
        if tokenizer_sha256(path) != spec.tokenizer_sha256:
            raise ValueError(f"tokenizer {path} changed since the cache was encoded (sha256 differs); "
                             f"{why}: re-encode the cache with it, or restore the original file")
        self.load_quantizer(load_tokenizer(path, device=self.word_embed.weight.device))

    def _embed(self, features: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embed(features.to(self.word_embed.weight.dtype))  # (B, n, D)
        return x if vector is None else x + vector

    def _indices(self, seq: torch.Tensor, scales: int) -> list[torch.Tensor]:
        """The first `scales` scales' codes of seq (B, >= their length), one tensor each."""
        sizes = self.order.step_sizes[:scales]
        return list(seq[:, :sum(sizes)].split(sizes, dim=1))

    @torch.no_grad()
    def _features(self, seq: torch.Tensor, scales: int, first: int) -> torch.Tensor:
        """Cvae-wide inputs of scales first..scales from the codes of scales < `scales`, in
        float32 whatever the autocast (the quantiser is the tokenizer's, frozen)."""
        with torch.autocast(seq.device.type, enabled=False):
            return self.quantizer.scale_inputs(self._indices(seq, scales), first)

    def teacher_forced(self, model, seq: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        features = self._features(seq, self.order.num_steps, 1)  # (B, N - pn_0^2, Cvae)
        return self._embed(features, vector)

    def step(self, model, s: int, seq: torch.Tensor, vector: torch.Tensor | None, rows: int):
        if s == 0:
            return None  # the prefill (the start token) predicts scale 0
        lo, hi = self.order.span(s)
        return self._embed(self._features(seq, s, s), vector), self.out_positions[lo:hi]


class ShuffleInputs(_Inputs):
    kind = "shuffle"
    tokenizer_kind = "discrete"
    token_table = True
    prefill_predicts_first = True

    def __init__(self, order: Order, prefix: int, dim: int, spec=None):
        super().__init__()
        if prefix < 1:
            raise ValueError("model.inputs.name=shuffle predicts the first step from the last prefix "
                             "position: it needs a condition prefix (model.class_condition.tokens >= 1)")
        self.order, self.prefix = order, prefix
        self.group = order.group_size  # G tokens per position (s x s for a cell order)
        self.length = order.num_steps - 1  # the last step is never an input
        blocks = spec.model.inputs.shuffle_blocks if spec is not None else 2
        self.fuse = TokenFuse(dim, self.group, blocks)
        self.unshuffle = TokenUnshuffle(dim, self.group, blocks)
        # position P - 1 + s predicts step s, so element i is predicted at P - 1 + step_of[i]
        self.register_buffer("out_positions", order.step_of + prefix - 1, persistent=False)
        self.register_buffer("blocks", torch.arange(prefix + self.length, device=CPU), persistent=False)
        self.causal = True

    def initialize(self) -> None:
        self.fuse.initialize()
        self.unshuffle.initialize()

    def _fused(self, model, tokens: torch.Tensor, vector) -> torch.Tensor:
        """Tokens (B, n * G) of n whole steps -> their fused inputs (B, n, D)."""
        x = model.embed_tokens(tokens, vector)  # (B, n * G, D)
        return self.fuse(x.unflatten(1, (-1, self.group)))  # (B, n, D)

    def teacher_forced(self, model, seq: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        return self._fused(model, seq[:, :-self.group], vector)  # (B, S - 1, D)

    def predictions(self, h: torch.Tensor) -> torch.Tensor:
        steps = h[:, self.prefix - 1:self.prefix - 1 + self.order.num_steps]  # (B, S, D)
        return self.unshuffle(steps).flatten(1, 2)  # (B, N, D)

    def draw_states(self, h: torch.Tensor, size: int) -> torch.Tensor:
        return self.unshuffle(h[:, -1])  # (R, G, D): the last fed position predicts the step

    def step(self, model, s: int, seq: torch.Tensor, vector: torch.Tensor | None, rows: int):
        if s == 0:
            return None  # the prefill's last position predicts step 0
        lo, hi = self.order.span(s - 1)
        pos = self.out_positions[hi:hi + 1]  # where step s - 1 goes in: P + s - 1
        return self._fused(model, seq[:, lo:hi], vector), pos

    def coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fused position sits at its step's mean grid coordinate over s = sqrt(G): the
        cell grid's coordinates for s x s cells (up to a constant), the token's for s = 1."""
        rows, cols = self.order.coords()
        scale = self.group ** 0.5
        mean = lambda c: c.double().view(-1, self.group).mean(1) / scale  # noqa: E731
        return mean(rows), mean(cols)


INPUTS = {"next_token": NextTokenInputs, "next_group": NextGroupInputs, "flow": FlowInputs,
          "next_scale": NextScaleInputs, "shuffle": ShuffleInputs}

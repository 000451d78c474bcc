"""The backbone and model: causality, KV-cached decoding equals a full forward, RoPE layout."""

import pytest
import torch

from ar.conditioning import ClassCondition
from ar.config import AR_SIZES, ModelConfig, transformer_args
from ar.model import ARModel
from ar.orders import RasterOrder
from ar.transformer import apply_rope, rope_2d
from conftest import cached_logits, tiny_model, tiny_spec


def logits_full(model, seq, labels):
    return model.head.logits(model.hidden(seq, ClassCondition(labels)))  # (B, N, V)


def test_causal_changing_a_later_token_leaves_earlier_logits(model):
    seq = torch.randint(0, 32, (2, 16))
    labels = torch.tensor([0, 1])
    base = logits_full(model, seq, labels)
    changed = seq.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 32
    after = logits_full(model, changed, labels)
    # logits row i predicts token i from tokens < i: rows 0..9 cannot see token 9
    assert torch.allclose(base[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(base[:, 10:], after[:, 10:])


@pytest.mark.parametrize("variant", [
    {}, {"n_kv_head": 2},  # multi-head and grouped-query attention
    {"cond_tokens": 3, "cond_rope": "identity", "pos_embed": "learned"},
    {"cond_add": True},  # the class embedding added to every token input
])
def test_kv_cached_decoding_equals_full_forward(variant):
    model = tiny_model(**variant)
    seq = torch.randint(0, 32, (3, 16))
    labels = torch.tensor([0, 2, 3])  # 3 is the null class
    full = logits_full(model, seq, labels)
    assert torch.allclose(full, cached_logits(model, seq, ClassCondition(labels)), atol=1e-5)


def test_condition_changes_prediction_and_null_class_exists(model):
    seq = torch.randint(0, 32, (1, 16))
    a = logits_full(model, seq, torch.tensor([0]))
    b = logits_full(model, seq, torch.tensor([model.cond.null]))
    assert model.cond.null == 3 and not torch.allclose(a, b)


def test_rope_2d_layout_rows_then_columns():
    table = rope_2d(torch.tensor([2]), torch.tensor([5]), head_dim=8, base=100.0)  # (1, 4, 2)
    freqs = torch.tensor([1.0, 100.0 ** -0.5])
    angles = torch.cat([2 * freqs, 5 * freqs])
    assert torch.allclose(table[0, :, 0], angles.cos()) and torch.allclose(table[0, :, 1], angles.sin())
    x = torch.randn(1, 1, 1, 8)
    zeroed = apply_rope(x, torch.zeros(1, 4, 2))
    assert torch.equal(zeroed, torch.zeros_like(x))  # LlamaGen's condition positions


def test_raster_order_round_trip():
    order = RasterOrder(3, 5)
    codes = torch.arange(30).view(2, 3, 5)
    seq = order.to_sequence(codes)
    assert torch.equal(seq[0], torch.arange(15))
    assert torch.equal(order.to_grid(seq), codes)
    rows, cols = order.coords()
    assert rows[7] == 1 and cols[7] == 2


def test_training_loss_decreases_on_a_memorisable_batch():
    torch.manual_seed(0)
    model = ARModel(tiny_spec()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    codes, labels = torch.randint(0, 32, (4, 4, 4)), torch.tensor([0, 1, 2, 0])
    first = None
    for _ in range(60):
        loss = model(codes, ClassCondition(labels))["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.5 * first


def test_registry_sizes_match_llamagen_parameter_counts():
    expected = {"AR-B": 111.0, "AR-L": 343.0, "AR-XL": 775.0, "AR-XXL": 1400.0}  # millions
    for size, millions in expected.items():
        spec = tiny_spec(vocab=16384, grid=16, classes=1000, size=size)
        with torch.device("meta"):
            model = ARModel(spec)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - millions) / millions < 0.03, (size, n)
    assert set(AR_SIZES) >= {"debug", "AR-B", "AR-L", "AR-XL", "AR-XXL"}
    a = transformer_args(ModelConfig(size="AR-L"))
    assert a.ffn_hidden == 2816 and a.head_dim == 64


def test_head_is_built_from_its_own_config():
    """model.token_head.label_smoothing reaches the head's loss (MaskGIT-style smoothing)."""
    from ar.heads import TokenHeadConfig

    smooth = tiny_model(token_head=TokenHeadConfig(label_smoothing=0.1))
    plain = tiny_model()
    seq, cond = torch.randint(0, 32, (2, 16)), ClassCondition(torch.tensor([0, 1]))
    with torch.no_grad():
        logits = plain.head.logits(plain.hidden(seq, cond))
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq.flatten(), label_smoothing=0.1)
        assert torch.allclose(smooth(seq.view(2, 4, 4), cond)["loss"], want, atol=1e-6)
        assert not torch.allclose(plain(seq.view(2, 4, 4), cond)["loss"], want)


def test_rows_extend_at_their_own_positions_and_overwrite_rejected_drafts():
    """Per-row positions (B, T) in extend (speculative decoding's rows advance independently):
    each row's hidden states equal the full forward pass, and a position fed again replaces
    the KV entry a rejected draft left there."""
    from ar.conditioning import ClassCondition
    from conftest import tiny_model

    model = tiny_model()
    for p in model.parameters():  # away from the zero init, so every input matters
        torch.nn.init.normal_(p, std=0.3)
    seq = torch.randint(0, 32, (2, 16))
    cond = ClassCondition(torch.tensor([0, 1]))
    with torch.no_grad():
        full = model.hidden(seq, cond)  # (B, N, D): element j + 1 comes from the input of token j
        model.setup_cache(2)
        _, vector = model.prefill(cond)
        ada, P = model.modulation(cond), model.prefix

        def feed(tokens, pos):  # position P + j holds token j
            return model.extend(model.embed_tokens(tokens, vector), pos, ada)

        draft = seq.clone()
        draft[1, 2] = (seq[1, 2] + 1) % 32  # a wrong draft for row 1's token 2
        h1 = feed(draft[:, 0:3], torch.tensor([[P, P + 1, P + 2], [P, P + 1, P + 2]]))
        # row 0 goes on; row 1 feeds its token 2 again (the draft was rejected), then goes on
        h2 = feed(torch.stack([seq[0, 3:6], seq[1, 2:5]]),
                  torch.tensor([[P + 3, P + 4, P + 5], [P + 2, P + 3, P + 4]]))
    assert torch.allclose(h1[0], full[0, 1:4], atol=1e-5) and torch.allclose(h1[1, :2], full[1, 1:3], atol=1e-5)
    assert not torch.allclose(h1[1, 2], full[1, 3], atol=1e-3)  # the draft's own output was wrong
    assert torch.allclose(h2[0], full[0, 4:7], atol=1e-5) and torch.allclose(h2[1], full[1, 3:6], atol=1e-5)

import torch

from ftrain.config import ModelConfig
from ftrain.model import GPT


def test_forward_shapes_and_loss():
    cfg = ModelConfig(seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.0)
    model = GPT(cfg)
    tokens = torch.randint(0, 256, (3, 16))
    assert model(tokens).shape == (3, 16, 256)
    loss = model(tokens, tokens)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_init_is_deterministic_per_seed():
    cfg = ModelConfig(seq_len=16, n_layer=1, n_head=2, d_model=32)
    torch.manual_seed(0)
    a = GPT(cfg).state_dict()
    torch.manual_seed(0)
    b = GPT(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_causal_attention_ignores_the_future():
    cfg = ModelConfig(seq_len=8, n_layer=2, n_head=2, d_model=16, dropout=0.0)
    model = GPT(cfg).eval()
    tokens = torch.randint(0, 256, (1, 8))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    assert torch.equal(model(tokens)[0, :-1], model(changed)[0, :-1])

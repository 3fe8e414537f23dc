import pytest
import torch
from PIL import Image

from diffusion import EMA, build_unet, from_uint8, save_grid, to_uint8


def test_ema_update_is_the_exponential_moving_average():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, b, p in zip(ema.ema_model.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
        assert not e.requires_grad
    assert not ema.ema_model.training


def test_ema_state_dict_round_trip_and_bad_input():
    model = build_unet("tiny")
    ema = EMA(model)
    assert ema.decay == 0.9999
    other = EMA(build_unet("tiny"))
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.ema_model.parameters(), ema.ema_model.parameters()))
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\)"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="different set of parameters"):
        ema.update(torch.nn.Linear(2, 2))


def test_uint8_conversions():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5])
    assert to_uint8(x).tolist() == [0, 64, 128, 255, 255]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(u)), u)


def test_save_grid_writes_a_png(tmp_path):
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    path = save_grid(x, tmp_path / "sub" / "grid.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)

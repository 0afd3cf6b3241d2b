"""``upcast_attention`` (a diffusers UNet config field, SD 2.1 768-v sets it): under half
precision the attention itself runs in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i_engine.nn import Attention


def test_upcast_attention_computes_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32) * 4
    plain, upcast = Attention(32, heads=2, head_dim=16), Attention(32, heads=2, head_dim=16, upcast=True)
    upcast.load_state_dict(plain.state_dict())
    plain, upcast = plain.to(torch.bfloat16), upcast.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        q, k, v = (upcast._split(layer(xb)) for layer in (upcast.to_q, upcast.to_k, upcast.to_v))
        core = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
        expected = upcast.to_out[0](core.transpose(1, 2).reshape(2, 16, 32))
        assert torch.equal(upcast(xb), expected)
        assert not torch.equal(plain(xb), expected)  # the flag is what makes the difference
        assert upcast(xb).dtype == torch.bfloat16

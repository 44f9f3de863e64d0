"""bench/compat.py's check of an architecture, as a test: every command succeeds, every block matrix is packed,
and the finetuned model's logits equal transformers' on the merged export and PEFT's over the same base."""

from __future__ import annotations

import pytest

@pytest.mark.slow  # each architecture: three quantizations, a finetune and an export on the command line
@pytest.mark.parametrize("arch", ["gemma2", "falcon", "gpt_neox"])  # scaled embeddings; fused QKV; a renamed head
def test_architecture_goes_through_every_command(arch, tmp_path):
    from compat import check

    from _common import Cli

    row = check(arch, Cli(tmp_path, threads=2), tmp_path)
    assert row[1:6] == ["✔"] * 5, row
    assert row[6] == "100.0%"
    assert float(row[7]) < 1e-4 and float(row[8]) < 1e-4, row


def test_linear_share_counts_what_stays_float_in_a_mixture_of_experts():
    """Mixtral's experts are 3-D tensors and its router a plain weight: the share is the attention linears over
    all three, counted from the config's shapes."""
    from transformers import AutoConfig

    from engine.model import linear_share, meta_model

    h, f, e, heads, kv, dim = 64, 128, 4, 4, 2, 16
    common = {"hidden_size": h, "intermediate_size": f, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": 512}
    attention = h * heads * dim * 2 + h * kv * dim * 2  # q, o; k, v
    assert linear_share(meta_model(AutoConfig.for_model("llama", **common))) == 1.0
    mixtral = meta_model(AutoConfig.for_model("mixtral", **common, num_local_experts=e))
    router, experts = e * h, e * 3 * h * f
    assert linear_share(mixtral) == pytest.approx(attention / (attention + router + experts))

"""bench/compat.py's check of an architecture, as a test: every command succeeds, every block matrix is packed,
and the finetuned model's logits equal transformers' on the merged export and PEFT's over the same base."""

from __future__ import annotations

import pytest


# Scaled embeddings; a fused QKV and a renamed head; experts (routed calibration, PEFT's stacked layout).  Every
# architecture is in bench/compat.py's table; these three keep CI's time.
@pytest.mark.slow  # each architecture: three quantizations, a finetune and an export on the command line
@pytest.mark.parametrize("arch", ["gemma2", "gpt_neox", "mixtral"])
def test_architecture_goes_through_every_command(arch, tmp_path):
    from compat import check

    from _common import Cli

    row = check(arch, Cli(tmp_path, threads=2), tmp_path)
    assert row[1:6] == ["✔"] * 5, row
    assert float(row[6].rstrip("%")) >= (99.0 if arch == "mixtral" else 100.0), row  # Mixtral: the router is float
    assert float(row[7]) < 1e-4 and float(row[8]) < 1e-4, row


def test_linear_share_counts_what_stays_float_in_a_mixture_of_experts():
    """Mixtral's experts are built one linear layer per expert; only its router (a plain weight) stays float: the
    share is everything but the router, counted from the config's shapes."""
    from transformers import AutoConfig

    from engine.model import linear_share, meta_model

    h, f, e, heads, kv, dim = 64, 128, 4, 4, 2, 16
    common = {"hidden_size": h, "intermediate_size": f, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": 512}
    attention = h * heads * dim * 2 + h * kv * dim * 2  # q, o; k, v
    assert linear_share(meta_model(AutoConfig.for_model("llama", **common))) == 1.0
    mixtral = meta_model(AutoConfig.for_model("mixtral", **common, num_local_experts=e))
    router, experts = e * h, e * 3 * h * f
    assert linear_share(mixtral) == pytest.approx((attention + experts) / (attention + router + experts))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_read_one_tensor_each_give_transformers_logits(arch, tmp_path):
    """A mixture-of-experts checkpoint as transformers saves it (one tensor per expert), read tensor by tensor
    into one linear layer per expert, computes what transformers' stacked experts compute."""
    import torch
    from compat import write_model
    from transformers import AutoModelForCausalLM

    from engine.model import load_resident, open_source

    write_model(arch, tmp_path)
    ours = load_resident(open_source(tmp_path))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    experts = [m for n, m in ours.named_modules() if n.endswith("mlp.experts")]
    assert len(experts) == 2 and all(isinstance(m, torch.nn.ModuleList) and len(m) == 4 for m in experts)

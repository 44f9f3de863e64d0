"""The chunked causal-LM loss: the model's own loss and gradients without the full logits tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.offload import DiskEmbedding, DiskHead, offload_vocab_tables
from engine.train.losses import chunked_causal_lm_loss, linear_cross_entropy, supports_chunked_loss


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=97, use_cache=False, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    for name, param in model.named_parameters():
        param.requires_grad_("q_proj" in name or "down_proj" in name)
    return model


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 23))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, 17:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model: LlamaForCausalLM, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return float(loss), grads


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_matches_the_models_own_loss_and_gradients(chunk_tokens):
    model, data = tiny_llama(torch.float32), batch()
    ref_loss, ref_grads = loss_and_grads(model, model(**data).loss)
    loss, grads = loss_and_grads(model, chunked_causal_lm_loss(model, data, chunk_tokens))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_bfloat16_is_as_accurate_as_the_models_own_loss():
    """Against float64 arithmetic, the bfloat16 tiled loss and gradients err no more than the model's own."""
    torch.manual_seed(0)
    exact = tiny_llama(torch.float64)
    model, data = copy.deepcopy(exact).to(torch.bfloat16), batch()
    exact_loss, exact_grads = loss_and_grads(exact, exact(**data).loss)
    own_loss, own_grads = loss_and_grads(model, model(**data).loss)
    loss, grads = loss_and_grads(model, chunked_causal_lm_loss(model, data, chunk_tokens=7))
    assert abs(loss - exact_loss) <= max(1.1 * abs(own_loss - exact_loss), 1e-3 * exact_loss)
    for got, own, ref in zip(grads, own_grads, exact_grads, strict=True):
        assert float((got.double() - ref).norm()) <= 1.1 * float((own.double() - ref).norm())


@pytest.mark.parametrize(("dtype", "rel", "grad_rel"), [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-3, 2e-2)])
def test_tables_on_disk_match_the_models_own_loss_and_gradients(tmp_path, dtype, rel, grad_rel):
    """Embeddings and head on disk (the head taken in ragged tiles of 13 rows) against the resident model.  The
    tiles' gradients add up in float32, the resident head's in one bfloat16 matmul: in bfloat16 they agree as
    wholes (relative norm of the difference), not element by element near zero."""
    model, data = tiny_llama(dtype), batch()
    ref_loss, ref_grads = loss_and_grads(model, model(**data).loss)
    ref_logits = model(input_ids=data["input_ids"]).logits
    assert offload_vocab_tables(model, tmp_path) == ["input embeddings", "output head"]
    assert isinstance(model.get_input_embeddings(), DiskEmbedding)
    assert isinstance(model.get_output_embeddings(), DiskHead) and supports_chunked_loss(model)
    loss, grads = loss_and_grads(model, chunked_causal_lm_loss(model, data, chunk_tokens=5))
    assert loss == pytest.approx(ref_loss, rel=rel)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert float((got.float() - ref.float()).norm()) <= grad_rel * float(ref.float().norm())
    torch.testing.assert_close(model(input_ids=data["input_ids"]).logits, ref_logits)  # the head's own forward


def test_scaled_output_gradient_and_no_grad():
    head = torch.nn.Linear(8, 11, bias=True, dtype=torch.float64).requires_grad_(False)
    hidden = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (1, 6))
    (3.0 * linear_cross_entropy(hidden, head, labels, chunk_tokens=4)).backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = head(ref_hidden)[0, :-1]
    (3.0 * torch.nn.functional.cross_entropy(logits, labels[0, 1:])).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    with torch.no_grad():
        assert float(linear_cross_entropy(hidden, head, labels)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, labels[0, 1:])))


def test_a_trained_head_falls_back_to_the_models_loss():
    model, data = tiny_llama(torch.float64), batch()
    model.lm_head.weight.requires_grad_(True)
    assert not supports_chunked_loss(model)
    torch.testing.assert_close(chunked_causal_lm_loss(model, data), model(**data).loss)
    with pytest.raises(ValueError, match="frozen output head"):
        linear_cross_entropy(torch.zeros(1, 2, 32, dtype=torch.float64), model.lm_head, data["labels"][:1, :2])


def dense_distillation(student, teacher, data, ce_weight):
    """LREC's loss from whole logits in float64: mean over predicted tokens of KL(p_t || p_s) + w CE."""
    with torch.no_grad():
        t_logits = teacher(input_ids=data["input_ids"]).logits[:, :-1].double()
    s_logits = student(input_ids=data["input_ids"]).logits[:, :-1].double()
    labels = data["labels"][:, 1:]
    mask = labels != -100
    log_p_s = torch.log_softmax(s_logits[mask], dim=-1)
    log_p_t = torch.log_softmax(t_logits[mask], dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    ce = torch.nn.functional.nll_loss(log_p_s, labels[mask])
    return kl + ce_weight * ce


@pytest.mark.parametrize(("ce_weight", "chunk_tokens"), [(1.0, 3), (0.0, 64), (2.5, 1)])
def test_tiled_distillation_matches_float64_dense(ce_weight, chunk_tokens):
    """LREC's tiled loss and gradients against the whole-logits formula in float64 (independent arithmetic)."""
    from engine.train.losses import linear_distillation

    torch.manual_seed(1)
    teacher, data = tiny_llama(torch.float32).requires_grad_(False), batch()
    student = copy.deepcopy(teacher)
    for name, param in student.named_parameters():
        param.data.add_(0.05 * torch.randn_like(param))
        param.requires_grad_("q_proj" in name or "down_proj" in name)
    ref_loss, ref_grads = loss_and_grads(student, dense_distillation(student, teacher, data, ce_weight))
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(input_ids=data["input_ids"]).last_hidden_state
    hidden = student.get_decoder()(input_ids=data["input_ids"]).last_hidden_state
    loss = linear_distillation(hidden, t_hidden, student.get_output_embeddings(), teacher.get_output_embeddings(),
                               data["labels"], ce_weight, chunk_tokens)
    loss, grads = loss_and_grads(student, loss)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))

"""Hugging Face transformers: attn_implementation="xegpu" routes a model's attention to the op.

Small models with random weights are built from configs (nothing is
downloaded).  A Llama-style decoder with grouped-query attention generates 32
tokens greedily for a left-padded batch of prompts of different lengths: the
tokens must equal those of the "sdpa" implementation, every attention call of
every layer and step must reach the op (SdpaSwap-like count of the calls the
op served), and the kernels compiled are counted (reported as the test's
`compilations` property and printed with -s).  A BERT-style encoder with a
padding mask must give the hidden states of a float64 eager reference within
the usual bound: 2x the error of the "sdpa" implementation (float32) plus a
floor; so must the decoder's logits.  transformers is a test dependency (requirements-test.txt), not one of
the package: `import torch_xegpu_attn` must not import it.
"""

import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import torch_xegpu_attn
from torch_xegpu_attn.compiler import COUNTERS

assert torch_xegpu_attn.register_transformers() == "xegpu"

PAD = 0


def llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always 32 new tokens
    return model


def left_padded(lengths, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


def calls_served() -> int:
    return torch_xegpu_attn.stats()["calls"]


def test_decoder_generate_matches_sdpa(cache_dir, fresh_seed, record_property):
    model = llama(fresh_seed)
    ids, mask = left_padded([5, 12, 9], model.config.vocab_size, fresh_seed)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                  pad_token_id=PAD)
        model.set_attn_implementation("xegpu")
        assert model.config._attn_implementation == "xegpu"
        compilations, calls = COUNTERS["compilations"], calls_served()
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                             pad_token_id=PAD)
        compilations, calls = COUNTERS["compilations"] - compilations, calls_served() - calls
    record_property("compilations", compilations)
    print(f"\ngenerate 32 tokens, 2 layers, padded batch of 3: {compilations} kernels compiled, {calls} calls")
    assert got.shape == (3, ids.shape[1] + 32)
    assert torch.equal(got, expected), "greedy tokens differ from the sdpa implementation"
    # One prefill and 31 decode steps, each through both layers: every call reached the op.
    assert calls == 32 * model.config.num_hidden_layers
    # The padded prefill (mask over batch, rows, keys) and the decode steps (one row): two kernels
    # for every length the loop goes through.
    assert compilations == 2


@pytest.mark.parametrize("lengths", [[9, 9], [4, 11, 7]], ids=["unpadded", "padded"])
def test_decoder_generate_with_static_cache(lengths, cache_dir, fresh_seed):
    # A static cache hands every layer the whole cache buffer (kv_len = the cache's length,
    # more than the prompt at prefill) and a mask of one shape per step: the decode steps
    # are replays of one recorded signature.
    model = llama(fresh_seed)
    ids, mask = left_padded(lengths, model.config.vocab_size, fresh_seed)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD,
                  cache_implementation="static")
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model.generate(input_ids=ids, **kwargs)
        model.set_attn_implementation("xegpu")
        before = torch_xegpu_attn.stats()
        got = model.generate(input_ids=ids, **kwargs)
        after = torch_xegpu_attn.stats()
    assert torch.equal(got, expected), "greedy tokens differ from the sdpa implementation"
    calls = after["calls"] - before["calls"]
    assert calls == 16 * model.config.num_hidden_layers
    assert after["replays"] - before["replays"] >= calls - 3  # all but the first call of each shape


def test_decoder_logits_within_bound(cache_dir, fresh_seed):
    model = llama(fresh_seed)
    ids, mask = left_padded([7, 16, 3], model.config.vocab_size, fresh_seed)
    valid = mask.bool()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("xegpu")
        ours = model(input_ids=ids, attention_mask=mask).logits
        reference = _float64_reference(model, input_ids=ids, attention_mask=mask).logits
    _within_bound(ours[valid], sdpa[valid], reference[valid])


def _training_step(model, implementation, **inputs):
    """(loss, parameter gradients) of one training step (train mode) with `implementation`."""
    model.train().set_attn_implementation(implementation)
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_decoder_training_step_within_bound(cache_dir, fresh_seed):
    """A training step of the GQA decoder on a left-padded batch: the loss and every parameter's
    gradient within 2x the "sdpa" implementation's error of a float64 step, plus a floor."""
    model = llama(fresh_seed)
    ids, mask = left_padded([7, 16, 3], model.config.vocab_size, fresh_seed)
    labels = ids.masked_fill(mask == 0, -100)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    sdpa_loss, sdpa_grads = _training_step(model, "sdpa", **inputs)
    calls = calls_served()
    loss, grads = _training_step(model, "xegpu", **inputs)
    assert calls_served() - calls == 2 * model.config.num_hidden_layers  # a forward and a backward kernel each
    model.double()
    try:
        ref_loss, ref_grads = _training_step(model, "sdpa", **inputs)
    finally:
        model.float().eval()
    _within_bound(loss.reshape(1), sdpa_loss.reshape(1), ref_loss.reshape(1))
    assert grads.keys() == sdpa_grads.keys() == ref_grads.keys()
    for name in grads:
        scale = max(1.0, ref_grads[name].abs().max().item())
        _within_bound(grads[name], sdpa_grads[name], ref_grads[name], floor=2e-6 * scale)


def test_set_attn_implementation_and_from_config(fresh_seed):
    model = llama(fresh_seed)
    model.set_attn_implementation("xegpu")
    assert model.model.layers[0].self_attn.config._attn_implementation == "xegpu"
    from transformers import AutoModelForCausalLM
    built = AutoModelForCausalLM.from_config(model.config, attn_implementation="xegpu")
    assert built.config._attn_implementation == "xegpu"


def test_output_attentions_raises(fresh_seed):
    model = llama(fresh_seed)
    model.set_attn_implementation("xegpu")
    ids, mask = left_padded([4, 6], model.config.vocab_size, fresh_seed)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def bert(seed: int) -> BertModel:
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def test_encoder_with_padding_mask(cache_dir, fresh_seed):
    model = bert(fresh_seed)
    generator = torch.Generator().manual_seed(fresh_seed)
    ids = torch.randint(3, 300, (3, 20), generator=generator)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 4:] = 0
    valid = mask.bool()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("xegpu")
        calls = calls_served()
        ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert calls_served() - calls == 2
        reference = _float64_reference(model, input_ids=ids, attention_mask=mask).last_hidden_state
    _within_bound(ours[valid], sdpa[valid], reference[valid])


def _float64_reference(model, **inputs):
    """The model in float64 with the "sdpa" implementation (SDPA computes float64 in float64;
    transformers' eager attention gives NaN on the padded rows of a left-padded batch, which
    reach the valid rows through zero weights); the model is restored to float32 and "xegpu"."""
    model.double().set_attn_implementation("sdpa")
    try:
        return model(**inputs)
    finally:
        model.float().set_attn_implementation("xegpu")


def _within_bound(ours, sdpa, reference, floor=2e-6):
    assert not ours.isnan().any()
    err = (ours.double() - reference).abs().max().item()
    sdpa_err = (sdpa.double() - reference).abs().max().item()
    assert err <= 2 * sdpa_err + floor, f"error {err:.3e} > 2 x SDPA's {sdpa_err:.3e} + {floor}"


def test_import_does_not_import_transformers():
    code = "import sys, torch_xegpu_attn; sys.exit('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "import torch_xegpu_attn imported transformers"

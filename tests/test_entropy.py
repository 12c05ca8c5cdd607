"""EntropyProbe: logit-lens oracle, detection, hooks leave nothing behind, sampling, robustness."""

from __future__ import annotations

import gc
import io
import math
import weakref

import pytest
import torch
from conftest import make_tiny_lora, make_tiny_qwen3
from torch import nn

from graff.errors import CheckpointError, GraffConfigError, GraffTypeError, ProbeError
from graff.probes._context import probing
from graff.probes.entropy import EntropyProbe, EntropyStats, entropy_from_logits
from graff.tokens import token_weights_from_entropy

transformers = pytest.importorskip("transformers")


def loop_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Oracle: per-row H = -sum p log p from probabilities, one Python loop per token (float64)."""
    out = []
    for row in logits.double().reshape(-1, logits.shape[-1]):
        p = torch.softmax(row, dim=0).tolist()
        out.append(-sum(pi * math.log(pi) for pi in p if pi > 0))
    return torch.tensor(out, dtype=torch.float64)


def base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def manual_lens(model: nn.Module, batch: dict, layer_index: int = 0) -> torch.Tensor:
    """Hidden state after decoder layer ``layer_index`` through model.model.norm and lm_head."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        base = base_of(model)
        hidden = out.hidden_states[layer_index + 1]
        return base.lm_head(base.model.norm(hidden))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# --- the entropy kernel ------------------------------------------------------------------------


def test_entropy_from_logits_matches_loop_oracle() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g) * 5
    logits[0, :3] = -math.inf  # zero probabilities contribute 0, not NaN
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_entropy(logits), atol=1e-5, rtol=0)


def test_entropy_bounds_uniform_and_one_hot() -> None:
    vocab = 13
    assert entropy_from_logits(torch.zeros(vocab)).item() == pytest.approx(math.log(vocab))
    one_hot = torch.full((vocab,), -math.inf)
    one_hot[4] = 0.0
    assert entropy_from_logits(one_hot).item() == 0.0


# --- logit lens on Hugging Face models, also through peft ----------------------------------------


@pytest.mark.parametrize("wrap", [False, True], ids=["qwen3", "qwen3-lora"])
@pytest.mark.parametrize("layer_index", [0, 1])
def test_probe_equals_manual_logit_lens_and_loop_oracle(wrap, layer_index, token_batch) -> None:
    model = make_tiny_qwen3(num_layers=3)  # hidden_states[-1] is after the final norm: avoid it
    model = make_tiny_lora(model) if wrap else model
    probe = EntropyProbe(model, layer_index=layer_index, max_tokens=None)
    with torch.no_grad():
        model(**inputs(token_batch))
    lens = manual_lens(model, inputs(token_batch), layer_index)
    n = token_batch["input_ids"].numel()
    assert torch.equal(probe.token_index, torch.arange(n))
    assert probe.entropies.dtype == torch.float32
    expected = loop_entropy(lens)
    torch.testing.assert_close(probe.entropies.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.entropies, entropy_from_logits(lens).reshape(-1))
    stats = probe.stats()
    assert stats.count == n
    assert stats.mean == pytest.approx(expected.mean().item(), abs=1e-5)
    assert stats.std == pytest.approx(expected.std(unbiased=False).item(), abs=1e-5)
    assert stats.min == pytest.approx(expected.min().item(), abs=1e-5)
    assert stats.max == pytest.approx(expected.max().item(), abs=1e-5)
    assert stats.normalized_mean == pytest.approx(stats.mean / math.log(96))
    assert probe.vocab_size == 96


def test_gpt2_style_model_is_detected() -> None:
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=96,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    probe = EntropyProbe(model, max_tokens=None)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        lens = model.lm_head(model.transformer.ln_f(hidden))
    torch.testing.assert_close(probe.entropies.double(), loop_entropy(lens), atol=1e-5, rtol=0)


class TupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.tanh(self.lin(x)), None


class ToyLM(nn.Module):
    """Not a Hugging Face model: layer returns a tuple, head is passed explicitly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.block = TupleLayer()
        self.out = nn.Linear(6, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.embed(ids))[0])


def test_custom_layer_returning_tuple_and_custom_head() -> None:
    model = ToyLM()
    probe = EntropyProbe(model, layer=model.block, head=model.out, max_tokens=None)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits = model(ids)
    torch.testing.assert_close(
        probe.entropies.double(), loop_entropy(logits.detach()), atol=1e-5, rtol=0
    )


# --- hooks change nothing and leave nothing behind ------------------------------------------------


def forward_backward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # LoRA dropout draws from the global RNG
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), grads


def test_outputs_and_gradients_bitwise_identical(token_batch) -> None:
    model = make_tiny_lora(make_tiny_qwen3(), dropout=0.1).train()
    logits_off, grads_off = forward_backward(model, token_batch)
    probe = EntropyProbe(model, max_tokens=5)
    logits_on, grads_on = forward_backward(model, token_batch)
    assert probe.calls == 1
    assert probe.stats().count == 5
    assert torch.equal(logits_on, logits_off)
    assert grads_on.keys() == grads_off.keys()
    assert grads_on
    for name, grad in grads_off.items():
        assert torch.equal(grads_on[name], grad), name


def test_remove_detaches_every_hook(tiny_lora_qwen3, token_batch) -> None:
    assert all_hooks(tiny_lora_qwen3) == 0
    probe = EntropyProbe(tiny_lora_qwen3)
    assert all_hooks(tiny_lora_qwen3) == 3
    probe.remove()
    probe.remove()  # idempotent
    assert not probe.active
    assert all_hooks(tiny_lora_qwen3) == 0
    assert tiny_lora_qwen3._forward_hooks == {}
    assert tiny_lora_qwen3._forward_pre_hooks == {}
    tiny_lora_qwen3(**inputs(token_batch))
    assert probe.calls == 0


def test_no_reference_cycles_and_no_leak_of_the_model(token_batch) -> None:
    model = make_tiny_qwen3()
    model_ref = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        probe = EntropyProbe(model, max_tokens=4)
        model(**inputs(token_batch))
        probe.remove()
        probe_ref = weakref.ref(probe)
        del probe
        assert probe_ref() is None  # freed by refcount alone: no cycle through the model
    finally:
        gc.enable()
    del model
    gc.collect()
    assert model_ref() is None


def test_forgotten_probe_removes_its_hooks(tiny_qwen3) -> None:
    probe = EntropyProbe(tiny_qwen3)
    assert all_hooks(tiny_qwen3) == 3
    del probe
    gc.collect()
    assert all_hooks(tiny_qwen3) == 0


def test_skipped_while_probing_active(tiny_qwen3, token_batch) -> None:
    probe = EntropyProbe(tiny_qwen3)
    with probing():
        tiny_qwen3(**inputs(token_batch))
    assert probe.calls == 0
    assert probe.entropies is None
    assert probe.stats() == EntropyStats(0.0, 0.0, 0.0, 0.0, 0, 0.0)


def test_activation_checkpoint_recompute_is_not_counted(token_batch) -> None:
    model = make_tiny_qwen3().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    probe = EntropyProbe(model, max_tokens=3)
    model(**token_batch).loss.backward()
    first = probe.token_index.clone()
    assert probe.calls == 1
    assert torch.equal(probe.token_index, first)


# --- sampling ------------------------------------------------------------------------------------


def test_subsample_size_range_and_determinism(token_batch) -> None:
    n = token_batch["input_ids"].numel()
    runs = []
    for _ in range(2):
        model = make_tiny_qwen3()
        probe = EntropyProbe(model, max_tokens=5, seed=7)
        indices = []
        for _ in range(3):
            model(**inputs(token_batch))
            idx = probe.token_index
            assert idx.numel() == 5
            assert idx.dtype == torch.long
            assert torch.equal(idx, idx.unique())  # distinct and ascending
            assert idx.min() >= 0
            assert idx.max() < n
            indices.append(idx.clone())
        runs.append(indices)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(runs[0][0], other) for other in runs[0][1:])
    model = make_tiny_qwen3()
    other_seed = EntropyProbe(model, max_tokens=5, seed=8)
    model(**inputs(token_batch))
    assert not torch.equal(other_seed.token_index, runs[0][0])


def test_padding_is_never_sampled(tiny_qwen3, token_batch) -> None:
    mask = token_batch["attention_mask"].clone()
    mask[0, :5] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    valid = mask.reshape(-1).nonzero().squeeze(1)
    probe = EntropyProbe(tiny_qwen3, max_tokens=None)
    tiny_qwen3(input_ids=token_batch["input_ids"], attention_mask=mask)
    assert torch.equal(probe.token_index, valid)
    sampled = EntropyProbe(tiny_qwen3, max_tokens=4, seed=1)
    for _ in range(5):
        tiny_qwen3(input_ids=token_batch["input_ids"], attention_mask=mask)
        assert sampled.token_index.numel() == 4
        assert bool(torch.isin(sampled.token_index, valid).all())
    tiny_qwen3(input_ids=token_batch["input_ids"])  # no mask this time: the old one is forgotten
    assert probe.token_index.numel() == token_batch["input_ids"].numel()


def test_bf16_model_gives_finite_float32_stats(token_batch) -> None:
    model = make_tiny_qwen3().to(torch.bfloat16)
    probe = EntropyProbe(model, max_tokens=8)
    model(**inputs(token_batch))
    stats = probe.stats()
    assert probe.entropies.dtype == torch.float32
    assert stats.count == 8
    assert all(math.isfinite(v) for v in (stats.mean, stats.std, stats.min, stats.max))
    assert 0.0 < stats.normalized_mean <= 1.0 + 1e-3


# --- hostile inputs ------------------------------------------------------------------------------


def test_nan_and_inf_entropies_are_dropped_and_counted(tiny_qwen3, token_batch) -> None:
    def head(hidden: torch.Tensor) -> torch.Tensor:  # hostile: NaN or +inf logits on some rows
        logits = torch.zeros(hidden.shape[0], 5)
        logits[hidden[:, 0] > 0, 0] = math.nan
        logits[hidden[:, 1] > 0, 1] = math.inf
        return logits

    probe = EntropyProbe(tiny_qwen3, layer=tiny_qwen3.model.layers[0], head=head, max_tokens=None)
    out = tiny_qwen3(**inputs(token_batch), output_hidden_states=True)
    hidden = out.hidden_states[1].reshape(-1, 32)
    bad = (hidden[:, 0] > 0) | (hidden[:, 1] > 0)
    assert 0 < int(bad.sum()) < bad.numel()
    assert probe.dropped_samples == int(bad.sum())
    assert torch.equal(probe.token_index, (~bad).nonzero().squeeze(1))
    stats = probe.stats()
    assert stats.count == int((~bad).sum())
    assert stats.mean == pytest.approx(math.log(5))
    assert stats.normalized_mean == pytest.approx(1.0)
    tiny_qwen3(**inputs(token_batch))
    assert probe.dropped_samples == 2 * int(bad.sum())


def test_all_dropped_gives_zero_stats_not_nan(tiny_qwen3, token_batch) -> None:
    probe = EntropyProbe(
        tiny_qwen3,
        layer=tiny_qwen3.model.layers[0],
        head=lambda h: torch.full((h.shape[0], 4), math.nan),
        max_tokens=3,
    )
    tiny_qwen3(**inputs(token_batch))
    assert probe.dropped_samples == 3
    assert probe.stats() == EntropyStats(0.0, 0.0, 0.0, 0.0, 0, 0.0)


def test_layer_returning_non_tensor_raises(tiny_qwen3, token_batch) -> None:
    class Weird(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "not a tensor"

    weird = Weird()
    probe = EntropyProbe(tiny_qwen3, layer=weird, head=tiny_qwen3.lm_head)
    with pytest.raises(ProbeError, match="float tensor"):
        weird(torch.zeros(1))
    assert probe.calls == 0


BAD_ARGS = [
    ({"model": "nope"}, GraffTypeError, "model must be a torch.nn.Module, got str"),
    ({"max_tokens": 0}, GraffConfigError, r"max_tokens must be a positive integer \(>= 1\), got 0"),
    ({"max_tokens": 2.5}, GraffTypeError, "max_tokens must be a positive integer, got 2.5"),
    (
        {"layer_index": 2},
        GraffConfigError,
        r"layer_index must be in \[0, 1\] .*2 decoder layers, got 2",
    ),
    ({"layer_index": -1}, GraffConfigError, "layer_index must be >= 0, got -1"),
    ({"layer_index": True}, GraffTypeError, "layer_index must be an int, got True"),
    ({"seed": -3}, GraffConfigError, "seed must be >= 0, got -3"),
    ({"seed": "0"}, GraffTypeError, "seed must be an int, got '0'"),
    ({"layer": "x"}, GraffTypeError, "layer must be a torch.nn.Module or None, got str"),
    ({"head": 3}, GraffTypeError, "head must be a callable"),
    ({"model": nn.Linear(2, 2)}, ProbeError, "found no decoder layers in Linear.*Pass layer="),
    ({"model": nn.Linear(2, 2), "layer": nn.Linear(2, 2)}, ProbeError, "Pass head="),
    ({"layer": nn.Linear(2, 2), "layer_index": 1}, GraffConfigError, "only used without layer="),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS)
def test_bad_arguments_raise_clear_errors(tiny_qwen3, kwargs, error, match) -> None:
    kwargs = dict(kwargs)
    model = kwargs.pop("model", tiny_qwen3)
    with pytest.raises(error, match=match):
        EntropyProbe(model, **kwargs)
    assert all_hooks(tiny_qwen3) == 0


# --- state ---------------------------------------------------------------------------------------


def test_state_dict_round_trip_replays_the_samples(token_batch) -> None:
    model_a, model_b = make_tiny_qwen3(), make_tiny_qwen3()
    probe_a = EntropyProbe(model_a, max_tokens=4, seed=5)
    for _ in range(3):
        model_a(**inputs(token_batch))
    buffer = io.BytesIO()
    torch.save(probe_a.state_dict(), buffer)
    buffer.seek(0)
    probe_b = EntropyProbe(model_b, max_tokens=4, seed=99)
    probe_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert probe_b.state_dict() == probe_a.state_dict()
    assert probe_b.state_dict()["format_version"] == 1
    model_a(**inputs(token_batch))
    model_b(**inputs(token_batch))
    assert torch.equal(probe_a.token_index, probe_b.token_index)
    assert probe_b.calls == 4


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (
            {"format_version": 2, "seed": 0, "calls": 0, "dropped_samples": 0},
            "format_version 1: got 2",
        ),
        ({"format_version": 1, "seed": 0}, r"missing keys \['calls', 'dropped_samples'\]"),
        ({"format_version": 1, "seed": 0, "calls": -1, "dropped_samples": 0}, "invalid calls=-1"),
        ([1, 2], "got None"),
    ],
)
def test_load_state_dict_rejects_bad_states(tiny_qwen3, state, match) -> None:
    with pytest.raises(CheckpointError, match=match):
        EntropyProbe(tiny_qwen3).load_state_dict(state)


# --- token weights from the probe ----------------------------------------------------------------


def test_probe_token_weights_follow_entropies(tiny_lora_qwen3, token_batch) -> None:
    labels = token_batch["labels"].clone()
    labels[0, 7] = -100
    mask = token_batch["attention_mask"].clone()
    mask[1, :2] = 0
    probe = EntropyProbe(tiny_lora_qwen3, max_tokens=None)
    tiny_lora_qwen3(input_ids=token_batch["input_ids"], attention_mask=mask, labels=labels)
    weights = probe.token_weights(labels, power=2.0)
    assert weights.shape == labels.shape
    target = torch.zeros_like(mask, dtype=torch.bool)
    target[:, :-1] = labels[:, 1:] != -100
    target &= mask.bool()
    full = torch.zeros(labels.numel())
    full[probe.token_index] = probe.entropies
    expected = token_weights_from_entropy(full.reshape(labels.shape), power=2.0, mask=target)
    torch.testing.assert_close(weights, expected)
    assert weights[target].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((weights[~target] == 0).all())
    assert weights[0, 6] == 0  # its target labels[0, 7] is ignored


def test_probe_token_weights_need_all_tokens(tiny_qwen3, token_batch) -> None:
    probe = EntropyProbe(tiny_qwen3, max_tokens=None)
    with pytest.raises(ProbeError, match="forward pass"):
        probe.token_weights()
    tiny_qwen3(**inputs(token_batch))
    with pytest.raises(GraffConfigError, match=r"labels must have the shape \(2, 12\)"):
        probe.token_weights(torch.zeros(2, 5, dtype=torch.long))
    sampled = EntropyProbe(tiny_qwen3, max_tokens=4)
    tiny_qwen3(**inputs(token_batch))
    with pytest.raises(ProbeError, match="max_tokens=None"):
        sampled.token_weights()


def test_chunked_decoding_equals_one_shot(monkeypatch, tiny_qwen3, token_batch) -> None:
    probe = EntropyProbe(tiny_qwen3, max_tokens=None)
    tiny_qwen3(**inputs(token_batch))
    one_shot = probe.entropies.clone()
    monkeypatch.setattr("graff.probes.entropy._CHUNK_ELEMENTS", 2 * 96 + 5)  # two rows per chunk
    calls = []
    head = probe._head
    monkeypatch.setattr(probe, "_head", lambda h: calls.append(h.shape[0]) or head(h))
    tiny_qwen3(**inputs(token_batch))
    assert calls == [2] * 12
    torch.testing.assert_close(probe.entropies, one_shot)


def test_kv_cache_step_uses_the_last_mask_columns(tiny_qwen3, token_batch) -> None:
    ids, mask = token_batch["input_ids"], token_batch["attention_mask"].clone()
    mask[0, :2] = 0
    mask[1, -1] = 0
    first = tiny_qwen3(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
    probe = EntropyProbe(tiny_qwen3, max_tokens=None)
    tiny_qwen3(input_ids=ids[:, 8:], attention_mask=mask, cache=first.cache)
    assert torch.equal(probe.token_index, mask[:, 8:].reshape(-1).nonzero().squeeze(1))


class MaskedToyLM(ToyLM):
    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(ids)


def test_mismatched_mask_warns_and_uses_all_tokens() -> None:
    model = MaskedToyLM()
    probe = EntropyProbe(model, layer=model.block, head=model.out, max_tokens=None)
    with pytest.warns(UserWarning, match=r"attention_mask of shape \(3, 3\) does not match"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), attention_mask=torch.ones(3, 3))
    assert torch.equal(probe.token_index, torch.arange(6))


def test_token_weights_give_dropped_tokens_weight_one(tiny_qwen3, token_batch) -> None:
    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = tiny_qwen3.lm_head(tiny_qwen3.model.norm(hidden))
        logits[hidden[:, 0] > 0] = math.nan
        return logits

    probe = EntropyProbe(tiny_qwen3, layer=tiny_qwen3.model.layers[0], head=head, max_tokens=None)
    out = tiny_qwen3(**inputs(token_batch), output_hidden_states=True)
    bad = (out.hidden_states[1][..., 0] > 0).clone()
    bad[:, -1] = False  # the last position predicts nothing: weight 0
    assert bool(bad.any())
    weights = probe.token_weights()
    assert bool((weights[bad] == 1).all())
    assert bool((weights[:, -1] == 0).all())
    assert weights[:, :-1].mean().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("training_only", [False, True])
def test_training_only_skips_passes_without_gradients(training_only, token_batch) -> None:
    """A scheduler's probe (``training_only=True``) neither counts nor decodes an evaluation
    pass, under ``no_grad`` or ``inference_mode``; a standalone probe (default) reads them all."""
    model = make_tiny_qwen3()
    probe = EntropyProbe(model, max_tokens=None, training_only=training_only)
    with torch.no_grad():
        model(**inputs(token_batch))
    with torch.inference_mode():
        model(**inputs(token_batch))
    assert probe.calls == (0 if training_only else 2)
    assert (probe.entropies is None) == training_only
    model(**inputs(token_batch))  # a training pass: read either way
    assert probe.calls == (1 if training_only else 3)
    assert probe.entropies is not None
    with pytest.raises(GraffTypeError):
        EntropyProbe(model, training_only=1)

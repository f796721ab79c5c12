"""Generation through the plain models with the adapter merged in (decode_weights.py) matches generation through
the peft model, for the student and for base, and never uses stale merged weights."""

import platform
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer.decode_weights import choose_decode_dtype, merge_blocker
from services.trainer.fused_layers import FusedRMSNorm, SiblingGroup, SiblingSlice
from services.trainer.items import GenerationRequest, GrpoItem, ScoreItem
from services.trainer.packed_linear import PackedLinear, native_bf16_matmul, packing_available
from services.trainer.settings import TrainerSettings
from support.tiny_student import make_student

PROMPTS = [[5, 6, 7, 8, 9], [42], [100, 200, 300]]


def greedy(student, *, use_adapter=True, merged=True) -> list[list[int]]:
    """Greedy token ids for PROMPTS, decoded through the plain models (merged) or the peft model."""
    decoder = student.merged_decoder
    if not merged:
        student.merged_decoder = None
    try:
        requests = [GenerationRequest(p, max_tokens=12, temperature=0) for p in PROMPTS]
        return [samples[0].token_ids for samples in student.generate(requests, use_adapter=use_adapter)]
    finally:
        student.merged_decoder = decoder


def big_step(student) -> None:
    """One GRPO step with a large learning rate, so the adapter (B starts at zero) changes greedy outputs."""
    items = [GrpoItem(p, [11, 12, 13, 14], advantage=1.0 if i % 2 else -1.0) for i, p in enumerate(PROMPTS)]
    student.grpo_step(items, LossSettings(beta=0.0, learning_rate=0.5, max_grad_norm=1e9))


@pytest.fixture
def student(tiny_random_model_dir, tmp_path):
    return make_student(tiny_random_model_dir, tmp_path)


def weight(layer) -> torch.Tensor:
    return layer.dense_weight() if isinstance(layer, (PackedLinear, SiblingSlice)) else layer.weight


def weights_of(model) -> dict[str, torch.Tensor]:
    """Every plain weight a decode copy computes with, by name: its parameters, and each fused member's rows."""
    found = dict(model.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, SiblingSlice) and module.group.packed is None:
            found[f"{name}.weight"] = module.dense_weight()
    return found


def storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_the_transformers_backend_merges_and_shares_the_base_tensors(tiny_random_model_dir, tmp_path):
    student = make_student(tiny_random_model_dir, tmp_path, decode_packed=False)
    decoder = student.merged_decoder
    assert decoder is not None and merge_blocker(student.model) is None
    assert not any(isinstance(m, PackedLinear) for m in decoder.student.modules())
    peft_base = storages(student.model.get_base_model().parameters())
    # base computes with the peft model's own tensors (its fused q/k/v read the rows W0 lives in); the student
    # owns only its target weights
    assert storages(weights_of(decoder.base).values()) <= peft_base
    owned = {
        n for n, t in weights_of(decoder.student).items() if t.untyped_storage().data_ptr() not in peft_base
    }
    assert owned == {f"{name}.weight" for name, _ in decoder.targets}


def test_the_decode_copies_fuse_siblings_and_norms_and_still_compute_what_transformers_does(
    tiny_random_model_dir, tmp_path
):
    student = make_student(tiny_random_model_dir, tmp_path, decode_packed=False)
    decoder = student.merged_decoder
    for plain in (decoder.base, decoder.student):
        attention = plain.model.layers[0].self_attn
        assert isinstance(attention.q_proj, SiblingSlice)
        assert attention.q_proj.group is attention.k_proj.group is attention.v_proj.group
        mlp = plain.model.layers[0].mlp
        assert mlp.gate_proj.group is mlp.up_proj.group is not attention.q_proj.group
        assert all(
            isinstance(m, FusedRMSNorm) for n, m in plain.named_modules() if n.endswith(("norm", "layernorm"))
        )
    assert decoder.base.model.layers[0].self_attn.q_proj.group is not (
        decoder.student.model.layers[0].self_attn.q_proj.group
    )  # the student's targets are its own
    big_step(student)
    ids = torch.tensor([PROMPTS[0]])
    for use_adapter in (True, False):
        plain = decoder.model(use_adapter, student.adapter_version)
        with torch.no_grad(), student.adapter(use_adapter):
            reference = student.model(input_ids=ids).logits
        assert torch.allclose(plain(input_ids=ids).logits, reference, atol=1e-5)


def test_merged_greedy_equals_peft_greedy_for_the_trained_student_and_for_base(student):
    fresh = greedy(student)
    big_step(student)
    trained = greedy(student, merged=False)
    assert trained != fresh  # the adapter is non-zero: the comparison below means something
    assert greedy(student) == trained
    assert greedy(student, use_adapter=False) == greedy(student, use_adapter=False, merged=False) == fresh
    big_step(student)  # a second step: the merged weights follow adapter_version
    assert greedy(student) == greedy(student, merged=False) != trained


def test_loading_an_adapter_state_invalidates_the_merged_weights(student):
    initial = {
        k: v.clone() for k, v in student.adapter_state().items()
    }  # on CPU the state aliases the adapter
    fresh = greedy(student)
    big_step(student)
    assert greedy(student) != fresh  # merged at adapter_version 1
    student.load_adapter_state(initial)  # adapter_version stays 1: only the invalidation forces a new merge
    assert greedy(student) == fresh


@pytest.mark.parametrize("packed", [False, True])
def test_a_bf16_decode_copy_casts_once_merges_in_float32_and_leaves_training_in_float32(
    tiny_random_model_dir, tmp_path, packed
):
    if packed and not packing_available(torch.bfloat16):
        pytest.skip("this torch or CPU does not pre-pack bf16 weights")
    student = make_student(tiny_random_model_dir, tmp_path, decode_dtype="bfloat16", decode_packed=packed)
    decoder = student.merged_decoder
    assert decoder.packed == packed
    assert student.model.get_base_model().dtype == torch.float32  # scoring and training stay float32
    assert decoder.base.dtype == decoder.student.dtype == torch.bfloat16
    assert all(
        weight(m).dtype == torch.bfloat16 for m in decoder.student.modules() if hasattr(m, "in_features")
    )
    if not packed:
        # one bf16 cast of each base tensor, shared by both copies; the student owns only its target weights
        base_storages = storages(weights_of(decoder.base).values())
        owned = {
            n
            for n, t in weights_of(decoder.student).items()
            if t.untyped_storage().data_ptr() not in base_storages
        }
        assert owned == {f"{name}.weight" for name, _ in decoder.targets}
    # rotary buffers keep float32, as transformers keeps them under bf16 weights
    assert all(b.dtype == torch.float32 for b in decoder.base.buffers() if b.is_floating_point())

    big_step(student)
    student.generate([GenerationRequest(PROMPTS[0], max_tokens=1, temperature=0)])  # syncs the merge
    name, module = decoder.targets[0]
    w0 = module.get_base_layer().weight
    merged = (
        w0 + module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
    )
    assert torch.equal(weight(decoder.student.get_submodule(name)), merged.detach().to(torch.bfloat16))
    # bf16 greedy picks the float32 model's best token up to bf16 rounding (this random model has near-ties)
    with torch.no_grad():
        for prompt, tokens in zip(PROMPTS, greedy(student), strict=True):
            logprobs = student.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
            assert logprobs.max() - logprobs[tokens[0]] < 0.05


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file(),
    reason="reads Linux's x86 CPU flags",
)
def test_native_bf16_matmul_is_the_cpus_avx512_bf16_or_amx():
    assert native_bf16_matmul() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())


def test_auto_decodes_in_bf16_only_a_float32_model_on_a_cpu_with_bf16_instructions():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16_here = native_bf16_matmul() and packing_available(torch.bfloat16)
    assert choose_decode_dtype("auto", torch.float32, cpu) == (torch.bfloat16 if bf16_here else torch.float32)
    assert choose_decode_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert choose_decode_dtype("auto", torch.float32, cuda) == torch.float32  # no cast on a GPU
    assert choose_decode_dtype("model", torch.float32, cpu) == torch.float32
    assert choose_decode_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16


def test_the_default_students_sampled_log_probs_stay_near_its_float32_scoring_and_weigh_near_one(
    tiny_random_model_dir, tmp_path
):
    """The shipped default (auto) decodes on this CPU in the dtype choose_decode_dtype picks. Where that is the
    bf16 copy, sampled log-probs differ from the float32 model's by bf16's rounding: GRPO's importance weights
    (old / sampler) then stay near 1 and none is truncated, as with a bf16 vLLM student."""
    default = TrainerSettings.model_fields["decode_dtype"].default
    student = make_student(tiny_random_model_dir, tmp_path, decode_dtype=default)
    expected = choose_decode_dtype(default, torch.float32, torch.device("cpu"))
    assert student.decode_dtype == student.merged_decoder.student.dtype == expected
    big_step(student)  # a merged adapter, not B = 0
    requests = [
        GenerationRequest(p, max_tokens=16, temperature=1.0, seed=i, logprobs=0)
        for i, p in enumerate(PROMPTS)
    ]
    samples = [s[0] for s in student.generate(requests)]
    scored = student.logprobs([ScoreItem(p, s.token_ids) for p, s in zip(PROMPTS, samples, strict=True)])
    gaps = [
        abs(a - b)
        for s, want in zip(samples, scored, strict=True)
        for a, b in zip(s.token_logprobs, want, strict=True)
    ]
    assert gaps and max(gaps) < (0.05 if expected == torch.bfloat16 else 1e-4)
    items = [
        GrpoItem(p, s.token_ids, advantage=1.0, sampler_logprobs=s.token_logprobs)
        for p, s in zip(PROMPTS, samples, strict=True)
    ]
    result = student.grpo_step(items, LossSettings(beta=0.0, learning_rate=1e-6))
    assert result.is_weight_mean == pytest.approx(1.0, abs=0.01) and result.is_truncated_fraction == 0.0


def packed_of(layer):
    """The packed weight holder of a decode linear: the layer itself, or the fused group it is a slice of."""
    return layer.group if isinstance(layer, SiblingSlice) else layer


@pytest.mark.skipif(
    not packing_available(torch.float32), reason="this torch or CPU does not pre-pack weights"
)
def test_on_cpu_every_decode_linear_is_packed_shared_as_the_plain_weights_and_repacked_at_each_merge(student):
    decoder = student.merged_decoder
    assert decoder.packed
    kinds = (torch.nn.Linear, PackedLinear, SiblingSlice)
    linears = {
        copy: {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
        for copy, model in (("base", decoder.base), ("student", decoder.student))
    }
    assert linears["base"] and not any(
        type(m) is torch.nn.Linear for c in linears.values() for m in c.values()
    )
    q, k, v = (linears["base"][f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert isinstance(q, SiblingSlice) and q.group is k.group is v.group  # one GEMM for the three
    targets = {name for name, _ in decoder.targets}
    for name, layer in linears[
        "student"
    ].items():  # non-targets (the lm_head) shared, targets the student's own
        assert (packed_of(layer) is packed_of(linears["base"][name])) == (name not in targets)
    peft_model = student.model.get_base_model()
    for name, layer in linears["base"].items():  # base packs the peft model's own W0 (float32: no cast)
        plain = peft_model.get_submodule(name)
        assert torch.equal(layer.dense_weight(), getattr(plain, "base_layer", plain).weight)

    big_step(student)
    trained = greedy(student, merged=False)
    assert greedy(student) == trained  # the student's targets were packed again at this adapter version
    for name, module in decoder.targets[:3]:  # q, k, v of layer 0: each slice of the fused group merged
        merged = module.get_base_layer().weight + module.scaling["default"] * (
            module.lora_B["default"].weight @ module.lora_A["default"].weight
        )
        assert torch.allclose(linears["student"][name].dense_weight(), merged.detach(), atol=1e-6)
        assert torch.equal(
            linears["base"][name].dense_weight(), module.get_base_layer().weight
        )  # base untouched


@pytest.mark.parametrize("pack", [False, True])
def test_a_fused_group_serves_each_member_its_own_product_whatever_the_call_order(pack):
    if pack and not packing_available(torch.float32):
        pytest.skip("this torch or CPU does not pre-pack weights")
    weights = [torch.randn(n, 16) for n in (8, 4, 4)]
    group = SiblingGroup(torch.cat(weights), [8, 4, 4], pack=pack)
    q, k, v = (SiblingSlice(group, i) for i in range(3))
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.allclose(q(x), x @ weights[0].T, atol=1e-5)
    assert torch.allclose(k(y), y @ weights[1].T, atol=1e-5)  # another input: computed again, not x's slice
    assert torch.allclose(v(y), y @ weights[2].T, atol=1e-5)
    assert torch.allclose(v(x), x @ weights[2].T, atol=1e-5)  # the last member dropped y's product
    group.load({1: torch.zeros(4, 16)})  # one member rewritten, the others kept
    assert torch.equal(k(x), torch.zeros(5, 4)) and torch.allclose(q(x), x @ weights[0].T, atol=1e-5)
    assert torch.equal(k.dense_weight(), torch.zeros(4, 16))


def test_a_fused_group_keeps_each_threads_product_apart():
    """The decode engine may prefill on one thread while it decodes on another, through the same layers: members
    called on two threads, interleaved, each get their own thread's product, computed once per thread."""
    weights = [torch.randn(n, 16) for n in (8, 4, 4)]
    group = SiblingGroup(torch.cat(weights), [8, 4, 4], pack=False)
    q, k, v = (SiblingSlice(group, i) for i in range(3))
    products = []
    product = group.product
    group.product = lambda x: products.append(x) or product(x)  # type: ignore[method-assign]
    x, y = torch.randn(5, 16), torch.randn(3, 16)
    a_started, b_done = threading.Event(), threading.Event()
    got = {}

    def a():
        got["q"] = q(x)
        a_started.set()
        b_done.wait(10)
        got["k"], got["v"] = k(x), v(x)

    def b():
        a_started.wait(10)
        got["y"] = (q(y), k(y), v(y))
        b_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for name, i in (("q", 0), ("k", 1), ("v", 2)):
        assert torch.allclose(got[name], x @ weights[i].T, atol=1e-5)
        assert torch.allclose(got["y"][i], y @ weights[i].T, atol=1e-5)
    assert len(products) == 2 and not group._last  # once per thread, and nothing kept after the last member


def test_a_norm_that_is_not_plain_rms_norm_keeps_its_own_module():
    from services.trainer.fused_layers import same_as

    class OnePlusWeightNorm(torch.nn.Module):  # Gemma's form: (1 + weight) * x / rms
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return (
                (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            )

    assert same_as(OnePlusWeightNorm()) is None


def test_a_compiled_decode_step_keeps_plain_linears_which_dynamo_can_trace(tiny_random_model_dir, tmp_path):
    student = make_student(tiny_random_model_dir, tmp_path, decode_compile=True)
    assert student.merged_decoder is not None and not student.merged_decoder.packed
    assert not any(isinstance(m, PackedLinear) for m in student.merged_decoder.student.modules())

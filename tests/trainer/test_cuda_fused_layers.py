"""On CUDA the decode copies' fused layers run Liger Kernel's Triton kernels (fused_layers.py): they must compute what
the peft model computes. Runs on a CUDA machine with liger-kernel installed (bench/gpu_serving.py's machine: see
bench/RESULTS.md); skipped elsewhere, where the torch path is tested by test_decode_weights.py."""

import contextlib

import pytest

torch = pytest.importorskip("torch")

from services.trainer.fused_layers import FusedAttention, FusedMLP, FusedRMSNorm, triton_kernels

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_kernels() is None, reason="needs CUDA and liger-kernel"
)


@pytest.fixture(autouse=True)
def float32_without_tf32():
    """float32 is held to 1e-4: TF32 off, which the trainer's load turns on for its whole process (loading.py) and
    an earlier test in this process may have loaded one."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device="cuda", dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # a non-zero adapter: student and base differ
    return model.eval()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_the_fused_copies_compute_the_peft_models_logits_for_the_student_and_for_base(dtype, tolerance):
    from services.trainer.decode_weights import MergedDecoder

    model = peft_llama(dtype)
    decoder = MergedDecoder(model)
    for plain in (decoder.base, decoder.student):
        layer = plain.model.layers[0]
        assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
        assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(plain.model.norm, FusedRMSNorm)
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        for use_adapter in (True, False):
            with model.disable_adapter() if not use_adapter else contextlib.nullcontext():
                expected = model(input_ids=ids).logits.float()
            got = decoder.model(use_adapter, adapter_version=1)(input_ids=ids).logits.float()
            assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance), (got - expected).abs().max()

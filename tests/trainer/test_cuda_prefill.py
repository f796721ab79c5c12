"""On CUDA a prefill of prompts that reuse no cached prefix attends through torch's flash varlen attention on the
packed sequence (decode/attention.py, flash_varlen); elsewhere, and with DecodeConfig.varlen_prefill off, through
the padded layout. Both must leave each prompt's next-token logits as the model's own forward computes them, in
an eager run and in the CUDA graph of its shape. Runs on a CUDA machine (bench/gpu_serving.py's); skipped
elsewhere, where the layout path is tested by test_decode_engine.py."""

import pytest

torch = pytest.importorskip("torch")

from services.trainer.decode import DecodeConfig
from services.trainer.decode.attention import flash_varlen, register
from services.trainer.decode.lane import Lane, Row
from services.trainer.items import GenerationRequest

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or flash_varlen(torch.device("cuda")) is None,
    reason="needs CUDA and torch's flash varlen attention",
)

PROMPT_LENGTHS = (
    5,
    37,
    70,
)  # three prompts: a bucket of four units (one empty) and padding tokens at the end


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()


def test_varlen_and_layout_prefills_give_the_models_own_next_token_logits():
    """Prompts new to the cache (own keys), then prompts extending them (keys gathered from the slots), each way
    eagerly, captured and replayed."""
    model = llama()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    children = [[*p, *torch.randint(3, 256, (20,), generator=generator).tolist()] for p in prompts]
    with torch.no_grad():
        expected = {
            kind: torch.stack(
                [model(input_ids=torch.tensor([p], device="cuda")).logits[0, -1].float() for p in group]
            )
            for kind, group in (("prompts", prompts), ("children", children))
        }
    model.set_attn_implementation(register())
    config = DecodeConfig.for_device(torch.device("cuda"), slots=8)
    lane = Lane(model, slots=8, config=config, device=torch.device("cuda"))
    assert lane.varlen_attention is not None
    for varlen in (True, False):
        config.varlen_prefill = varlen
        for run in range(3):  # eager, then captured, then replayed
            lane.index.clear()
            for kind, group in (("prompts", prompts), ("children", children)):
                reused = lane.reused_tokens
                rows = [
                    Row(
                        GenerationRequest(p, max_tokens=4, temperature=0), index=i, sample=0, seed=i, stops=()
                    )
                    for i, p in enumerate(group)
                ]
                with torch.inference_mode():
                    placed, passes = lane.place(rows)
                assert passes == 1 and len(placed) == len(group)
                got = lane.logits[[row.slot for row in rows]].clone()
                for row in placed:
                    lane.release(row.slot)  # its prompt stays for the children to reuse
                if kind == "children":
                    # the two longer prompts whole: found by their 16-token blocks, then matched as far as they agree
                    assert lane.reused_tokens - reused == 37 + 70
                error = (got - expected[kind]).abs().max()
                assert torch.allclose(got, expected[kind], atol=5e-2, rtol=5e-2), (varlen, run, kind, error)
    assert lane.graphs.captures >= 4 and lane.graphs.failure is None


def test_the_loop_counts_who_waited_for_whom():
    """A run's waits on CUDA: the host's for the sampled tokens (read_wait_seconds, some every step), and the
    launches that found the device idle (idle_launches, at most one a step); a varlen prefill's graph serves
    prompts of other widths in the same token bucket (its key leaves width and window out)."""
    from services.trainer.decode import DecodeEngine

    model = llama()
    engine = DecodeEngine(
        lambda lane: (model, 0),
        None,
        eos_ids=[],
        device=torch.device("cuda"),
        config=DecodeConfig.for_device(torch.device("cuda"), slots=8),
    )
    generator = torch.Generator().manual_seed(2)
    for lengths in ((40, 41), (40, 41), (33, 48)):  # eager, captured, then replayed at other widths
        requests = [
            GenerationRequest(torch.randint(3, 256, (n,), generator=generator).tolist(), max_tokens=12)
            for n in lengths
        ]
        with torch.inference_mode():
            samples = engine.generate([("student", r) for r in requests], finish=lambda r, ids, *rest: ids)
        assert [len(s[0]) for s in samples] == [12, 12]
    lane = engine.lanes["student"]
    prefills = [key for key in lane._prefills_seen if key[0] == "prefill"]
    assert len(prefills) == 1, prefills
    assert engine.decode_steps >= 3 * 12
    assert engine.read_wait_seconds > 0
    assert 0 <= engine.idle_launches <= engine.decode_steps

"""Where does a decode step's time go? Student.generate timed per decode pass, and the model's forward alone.

    TRAINER_MODEL_SOURCE=<dir with SmolLM2-135M config.json + tokenizer, no weights> python bench/decode_speed.py

Random weights of the real shape (a config-only directory: see services/trainer/model_source.py), so every row
runs to max_tokens and the figures do not depend on what the model writes. Prompts are GSM8K test questions
(GSM8K_PATH, else the copy shipped in orchestrator/gsm8k/). Prints tokens/s and ms per decode pass for greedy and
sampled batches of 1 to 256 rows, the forward pass alone through the peft model with the adapter on and off, and a
profiler table of one batch.
Used on the lent H100 (bench/RESULTS.md, "Trainer decode on the H100").
"""
import sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from services.trainer.settings import TrainerSettings
from services.trainer.items import GenerationRequest
from services.trainer.loading import load_student
from orchestrator.gsm8k.data import load_gsm8k

s = TrainerSettings()
st = load_student(s)
tok = st.tokenizer
qs = [p.prompt for p in load_gsm8k("test", limit=256)]
ids = []
for q in qs:
    t = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    ids.append(list(tok(t, add_special_tokens=False).input_ids))
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
def gen(rows, temp, n=1, lp=None, stop=(), T=64, adapter=True):
    reqs = [GenerationRequest(prompt_ids=ids[i % 256], n=n, max_tokens=T, temperature=temp, logprobs=lp, stop=list(stop)) for i in range(rows)]
    sync(); t = time.perf_counter(); fp = st.forward_passes
    out = st.generate(reqs, use_adapter=adapter); sync(); dt = time.perf_counter() - t
    toks = sum(x.num_generated for r in out for x in r); passes = st.forward_passes - fp
    print(f"gen rows={rows*n:4d} T={temp} lp={lp} stop={list(stop)} adapter={adapter}: {dt:6.2f}s {toks:6d} tok {toks/dt:8.0f} tok/s {1000*dt/max(passes,1):6.1f} ms/pass", flush=True)
gen(8, 0.0, T=8)  # warm-up
for rows in (1, 32, 256):
    gen(rows, 0.0)
gen(256, 0.0, adapter=False)
gen(32, 1.0, n=8)
gen(32, 1.0, n=8, stop=["\n"])
gen(32, 1.0, n=8, lp=0, stop=["\n"])
# the model alone: one decode forward at batch B with a cache of ~160 tokens
from transformers import DynamicCache
for B in (1, 32, 256):
    for adapter in (True, False):
        with torch.inference_mode(), st.adapter(adapter):
            x = torch.tensor([ids[i % 256][:100] + [5] * (100 - len(ids[i % 256][:100])) for i in range(B)], device=st.device)
            cache = DynamicCache(config=st.model.config)
            st.model(input_ids=x, use_cache=True, past_key_values=cache, logits_to_keep=1)
            nxt = torch.ones(B, 1, dtype=torch.long, device=st.device)
            for _ in range(3): st.model(input_ids=nxt, use_cache=True, past_key_values=cache)
            sync(); t = time.perf_counter()
            for _ in range(20): st.model(input_ids=nxt, use_cache=True, past_key_values=cache)
            sync(); print(f"model forward B={B} adapter={adapter}: {1000*(time.perf_counter()-t)/20:.2f} ms", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    gen(256, 1.0, stop=["\n"], T=16)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60), flush=True)

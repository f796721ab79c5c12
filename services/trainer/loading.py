"""Loading the student: resolve the model source, load the backend the settings ask for (TRAINER_BACKEND: Unsloth,
or transformers + peft with bitsandbytes 4-bit on CUDA and float32 on CPU; auto = Unsloth on CUDA when installed),
attach a fresh LoRA adapter, and make the optimizer. What the backend lets the Student do comes back with it
(backends.py)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

from .backends import Backend, BackendUnavailable, transformers_backend, unsloth_backend
from .model_source import ModelSourceError, ResolvedModel, resolve_model
from .settings import TrainerSettings
from .student import Student

log = logging.getLogger(__name__)


def load_student(settings: TrainerSettings) -> Student:
    """Resolve the model source, load the backend that fits the machine, and attach a fresh LoRA adapter."""
    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(settings.seed)  # LoRA A matrices are random; B starts at zero
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_model(settings.model_source, settings.model_cache_dir)
    unsloth_here = device.type == "cuda" and importlib.util.find_spec("unsloth") is not None
    if settings.backend == "unsloth" and not unsloth_here:
        raise BackendUnavailable(
            "TRAINER_BACKEND=unsloth needs a CUDA device and the unsloth package (pip install '.[gpu]'); "
            f"device {device}, unsloth {'installed' if importlib.util.find_spec('unsloth') else 'not installed'}"
        )
    want_unsloth = settings.backend == "unsloth" or (settings.backend == "auto" and unsloth_here)
    if want_unsloth and resolved.kind == "random":
        log.warning(
            "%s holds no weights (a random-init model): Unsloth cannot load it, transformers does",
            resolved.path,
        )
        want_unsloth = False
    if want_unsloth:
        model, tokenizer, backend = _load_unsloth(resolved, settings)
    else:
        model, tokenizer, backend = _load_transformers(resolved, settings, device)
    for note in backend.notes:
        log.info("%s backend: %s", backend.name, note)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings, device)
    return Student(
        model, tokenizer, optimizer, backend=backend, device=device, name=resolved.name, settings=settings
    )


def make_optimizer(
    params: Iterable[torch.nn.Parameter], settings: TrainerSettings, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW; 8-bit (bitsandbytes) on CUDA where installed."""
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]  (the gpu extra)

        return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _load_unsloth(resolved: ResolvedModel, settings: TrainerSettings) -> tuple[Any, Any, Backend]:
    # Unsloth's load fetches a README from the hub as usage statistics unless this is set (or it loads offline).
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    if not settings.compile_layers:  # Unsloth's own per-block compile is the backend's compiled layers
        os.environ["UNSLOTH_BLOCK_COMPILE"] = "0"
    from unsloth import (  # pyright: ignore[reportMissingImports]  (the gpu extra)
        FastLanguageModel,  # imported only here: it patches transformers on import
    )

    # A local directory loads as it is: no hub look-up, and no renaming to one of Unsloth's pre-quantised repos.
    local = resolved.kind == "hf_dir"
    checkpointing = "unsloth" if settings.gradient_checkpointing else False
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=resolved.path,
            max_seq_length=settings.max_context,
            load_in_4bit=settings.load_in_4bit,
            dtype=None,  # bf16 where the GPU has it
            local_files_only=local,
            use_exact_model_name=local,
            use_gradient_checkpointing=checkpointing,
            offload_embedding=False,  # decoding reads the embeddings at every step: they stay on the GPU
            random_state=settings.seed,
        )
    except Exception as exc:  # a missing or corrupt model, an architecture Unsloth does not know
        raise ModelSourceError(f"model_source: Unsloth cannot load {resolved.path}: {exc}") from exc
    model = FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=settings.seed,
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if trained:  # Unsloth added a token (e.g. a pad) and trains the embeddings and head in full
        log.warning(
            "Unsloth trains more than the LoRA adapter (%d tensors, e.g. %s): the checkpoints hold them too, "
            "and the lm_head is not fused into the log-softmax",
            len(trained),
            trained[:2],
        )
    return model, tokenizer, unsloth_backend()


def _load_transformers(
    resolved: ResolvedModel, settings: TrainerSettings, device: torch.device
) -> tuple[Any, Any, Backend]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        if resolved.kind == "random":
            config = AutoConfig.from_pretrained(resolved.path)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            kwargs: dict[str, Any] = {"dtype": torch.float32}
            if device.type == "cuda":
                kwargs["dtype"] = torch.bfloat16
                if settings.load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
                    from transformers import BitsAndBytesConfig

                    kwargs["quantization_config"] = BitsAndBytesConfig(
                        load_in_4bit=True,
                        bnb_4bit_quant_type="nf4",
                        bnb_4bit_compute_dtype=torch.bfloat16,
                        bnb_4bit_use_double_quant=True,
                    )
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except ModelSourceError:
        raise
    except Exception as exc:  # corrupt weights, unreadable tokenizer, unknown architecture
        raise ModelSourceError(f"model_source: cannot load {resolved.path}: {exc}") from exc
    if getattr(model, "quantization_config", None) is None:
        model.to(device)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    compiled = device.type == "cuda" and _speed_up_cuda(model, settings)
    return model, tokenizer, transformers_backend(compiled_layers=compiled)


def _speed_up_cuda(model: Any, settings: TrainerSettings) -> bool:
    """Activation checkpointing, TF32 for what stays float32, and a compiled decoder layer (bench/RESULTS.md);
    True when the layers are compiled."""
    torch.backends.cuda.matmul.allow_tf32 = True
    if settings.gradient_checkpointing:  # only active in train mode, i.e. inside grpo_step
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if settings.compile_layers:
        from torch import _dynamo

        # One compiled code object serves every layer; variants: train / no-grad / inference mode, adapter on or
        # off, and a few shapes until dynamo marks batch and length dynamic.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        for layer in model.get_base_model().model.layers:
            layer.compile()
    return settings.compile_layers

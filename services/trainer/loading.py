"""Loading the student: resolve the model source, load the backend that fits the machine (Unsloth on CUDA when
installed; else transformers + peft, bitsandbytes 4-bit on CUDA, float32 on CPU), attach a fresh LoRA adapter,
and make the optimizer."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import torch

from .model_source import ModelSourceError, ResolvedModel, resolve_model
from .settings import TrainerSettings
from .student import Student


def load_student(settings: TrainerSettings) -> Student:
    """Resolve the model source, load the backend that fits the machine, and attach a fresh LoRA adapter."""
    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(settings.seed)  # LoRA A matrices are random; B starts at zero
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_model(settings.model_source, settings.model_cache_dir)
    want_unsloth = settings.backend == "unsloth" or (
        settings.backend == "auto"
        and device.type == "cuda"
        and importlib.util.find_spec("unsloth") is not None
    )
    if want_unsloth and resolved.kind != "random":
        model, tokenizer = _load_unsloth(resolved.path, settings)
        backend = "unsloth"
    else:
        model, tokenizer = _load_transformers(resolved, settings, device)
        backend = "transformers"
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


def _load_unsloth(path: str, settings: TrainerSettings) -> tuple[Any, Any]:
    from unsloth import (  # pyright: ignore[reportMissingImports]  (the gpu extra)
        FastLanguageModel,  # imported only here: it patches transformers on import
    )

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=settings.max_context, load_in_4bit=settings.load_in_4bit, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        random_state=settings.seed,
    )
    return model, tokenizer


def _load_transformers(
    resolved: ResolvedModel, settings: TrainerSettings, device: torch.device
) -> tuple[Any, Any]:
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
    if device.type == "cuda":
        _speed_up_cuda(model, settings)
    return model, tokenizer


def _speed_up_cuda(model: Any, settings: TrainerSettings) -> None:
    """Activation checkpointing, TF32 for what stays float32, and a compiled decoder layer (bench/RESULTS.md)."""
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
        model.compiled_layers = True

"""Sampling the next token on the GPU: the proposed replacement for services.trainer.sampling.sample_next.

The engine's sampler copies the whole (rows x vocabulary) probability matrix to the host every decode step and
draws one torch.multinomial per row there. Here the draw stays on the device with the exponential race
(equivalent to Gumbel-max): for i.i.d. E_v ~ Exp(1), argmax_v p_v / E_v is distributed as p.
Rows with a seed get their own device generator (seeded once from the row's host generator, then advanced by
every draw), so a seeded request's text still does not depend on what else shares its batch.
"""

from __future__ import annotations

import torch

from services.trainer.sampling import top_p_filter


class DeviceSampler:
    """Callable with sample_next's signature; keeps one device generator per seeded host generator."""

    def __init__(self) -> None:
        self._device_generators: dict[int, tuple[torch.Generator, torch.Generator]] = {}

    def _generator_for(self, host: torch.Generator, device: torch.device) -> torch.Generator:
        key = id(host)
        found = self._device_generators.get(key)
        if found is None or found[0] is not host:
            if len(self._device_generators) > 4096:
                self._device_generators.clear()
            found = (host, torch.Generator(device=device).manual_seed(host.initial_seed()))
            self._device_generators[key] = found
        return found[1]

    def __call__(self, logits, temperature, top_p, generators, default_generator) -> torch.Tensor:
        logits = logits.float()
        chosen = logits.argmax(dim=-1)
        sampled_rows = [i for i, t in enumerate(temperature) if t > 0]
        if not sampled_rows:
            return chosen
        rows = torch.tensor(sampled_rows, device=logits.device)
        temps = torch.tensor([temperature[i] for i in sampled_rows], device=logits.device).unsqueeze(1)
        scaled = logits[rows] / temps
        ps = torch.tensor([top_p[i] for i in sampled_rows], device=logits.device)
        if any(top_p[i] < 1.0 for i in sampled_rows):
            scaled = top_p_filter(scaled, ps)
        probs = torch.softmax(scaled, dim=-1)
        race = torch.empty_like(probs).exponential_()  # unseeded rows: the device's default generator
        for k, row in enumerate(sampled_rows):
            if generators[row] is not None:
                race[k].exponential_(generator=self._generator_for(generators[row], logits.device))
        chosen[rows] = (probs / race).argmax(dim=-1)
        return chosen

"""HFEngine: the RolloutEngine interface over `transformers` generate (a slower fallback to vLLM)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from rollout.types import Sample, SamplingConfig, SyncStats

log = logging.getLogger(__name__)


@contextmanager
def our_sampling_only(model):
    """While open, `model.generate` samples with the settings it is given and transformers' neutral defaults only.

    generate() fills every setting a call leaves None from the model's generation_config.json (a Qwen-Instruct-style
    model: top_p 0.8, repetition_penalty 1.05), so the engine would sample from, and report log-probs of, another
    distribution than the full softmax the trainer scores. The model's own config is put back afterwards (a model
    exported later keeps it)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                               pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


class HFEngine:
    """Generation with `model.generate` in this process.

    model: a checkpoint directory / hub name, or a loaded causal LM (then pass `tokenizer`).
    Logprobs are those of the distribution each token was sampled from (the warped scores:
    temperature, top-k, top-p), like VLLMEngine's. With `seed`, a call is reproducible, but the
    random stream differs from vLLM's, so sampled tokens differ between the two engines.
    """

    def __init__(
        self,
        model,
        *,
        tokenizer=None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        **_ignored,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("HFEngine generates with transformers: slower than vLLM, meant as a fallback")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, (str, os.PathLike)):
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
            self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype).to(self.device)
            tokenizer = tokenizer or str(model)
        else:
            self.model = model
        if tokenizer is None:
            raise ValueError("HFEngine needs a tokenizer when given a model object")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.model.eval()
        self.seed = seed
        self.batch_size = batch_size
        self.weight_version = 0
        self._params = dict(self.model.named_parameters())

    # ------------------------------------------------------------------------------ generation
    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        return [int(t) for t in prompt]

    @torch.no_grad()
    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        encoded = [self._encode(p) for p in prompts]
        rows = [(i, ids) for i, ids in enumerate(encoded) for _ in range(sampling.n)]
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.batch_size):
                samples += self._generate_batch(rows[start : start + self.batch_size], sampling)
        return samples

    def _generate_batch(self, rows: list[tuple[int, list[int]]], sampling: SamplingConfig) -> list[Sample]:
        from transformers import GenerationConfig

        tok = self.tokenizer
        eos = tok.eos_token_id
        stop_ids = ([eos] if eos is not None else []) + list(sampling.stop_token_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        width = max(len(ids) for _, ids in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, ids) in enumerate(rows):  # left padding
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        greedy = sampling.temperature == 0
        gen_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            # 0 disables top-k; None would fall back to transformers' default top_k=50, a distribution the trainer never sees
            top_k=None if greedy else max(sampling.top_k, 0),
            top_p=None if greedy else sampling.top_p,
            eos_token_id=stop_ids or None,
            pad_token_id=pad,
            stop_strings=list(sampling.stop) or None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        with our_sampling_only(self.model):
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=gen_config,
                tokenizer=tok if sampling.stop else None,
            )
        new = out.sequences[:, width:].cpu()
        # scores are the processed (warped) logits the token was drawn from; greedy: raw logits.
        logp = torch.stack([F.log_softmax(s.float(), dim=-1).cpu() for s in out.scores], dim=1)
        token_logp = torch.gather(logp, 2, new.unsqueeze(-1)).squeeze(-1)

        samples = []
        for r, (prompt_index, ids) in enumerate(rows):
            comp = new[r].tolist()
            end, reason = len(comp), "length"
            for j, t in enumerate(comp):
                if t in stop_ids:
                    end, reason = j + 1, "stop"
                    break
            text = tok.decode(comp[:end], skip_special_tokens=True)
            if sampling.stop:
                end, reason, text = self._cut_at_stop_string(comp, end, reason, text, sampling.stop)
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    prompt_ids=list(ids),
                    completion_ids=comp[:end],
                    text=text,
                    logprobs=token_logp[r, :end].tolist(),
                    finish_reason=reason,
                    weight_version=self.weight_version,
                )
            )
        return samples

    def _cut_at_stop_string(self, comp, end, reason, text, stops):
        """Cut after the first token that completes a stop string; the text loses the stop string."""
        hits = [text.find(s) for s in stops if s in text]
        if not hits:
            return end, reason, text
        for j in range(1, end + 1):  # shortest prefix whose text holds a stop string
            prefix = self.tokenizer.decode(comp[:j], skip_special_tokens=True)
            if any(s in prefix for s in stops):
                cut = min(prefix.find(s) for s in stops if s in prefix)
                return j, "stop", prefix[:cut]
        return end, reason, text

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def _copy_in(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int]:
        nbytes, count = 0, 0
        for name, tensor in pairs:
            param = self._params.get(name)
            if param is None:
                raise KeyError(f"HFEngine: the model has no parameter {name!r}")
            param.copy_(tensor.to(param.device, param.dtype))
            nbytes += tensor.nbytes
            count += 1
        return nbytes, count

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        start = time.perf_counter()
        nbytes, count = self._copy_in(named_tensors)
        if count == 0:
            raise ValueError("weight sync got no tensors")
        self.weight_version = int(version)
        return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start, tensors=count)

    # the rollout server's chunked protocol
    def begin_weight_update(self) -> None:
        pass

    def load_weight_file(self, path: str, delete: bool = True) -> None:
        from safetensors.torch import load_file

        try:
            self._copy_in(load_file(path).items())
        finally:
            if delete and os.path.exists(path):
                os.remove(path)

    def finish_weight_update(self, version: int) -> None:
        self.weight_version = int(version)

    def close(self) -> None:
        self.model = None
        self._params = {}

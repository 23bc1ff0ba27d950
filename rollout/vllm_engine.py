"""VLLMEngine: a colocated, in-process `vllm.LLM` behind the RolloutEngine interface."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

from rollout.openai_completions import set_texts
from rollout.types import Sample, SamplingConfig, SyncStats
from rollout.weight_sync import (
    DEFAULT_CHUNK_BYTES,
    LLMSyncClient,
    ShmTransport,
    TransferEngineTransport,
    as_weight_source,
)

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.worker_extension.WeightSyncExtension"

# The logprob of each sampled token under the distribution it was actually drawn from:
# log_softmax(logits / temperature) after top-k/top-p masking. vLLM's default, "raw_logprobs",
# ignores the temperature, which would bias every PPO importance ratio at T != 1.
LOGPROBS_MODE = "processed_logprobs"
CPU_MAX_MODEL_LEN = 1024  # longest default context on CPU, where the KV cache is small (GPUs take the model's own)
CPU_MAX_NUM_SEQS = 256


def cpu_context_length(model: str) -> int:
    """The default context on CPU: CPU_MAX_MODEL_LEN, or the model's own when shorter (vLLM refuses a longer one)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):  # vLLM will say what is wrong with the model
        return CPU_MAX_MODEL_LEN
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return min(CPU_MAX_MODEL_LEN, getattr(text, "max_position_embeddings", None) or CPU_MAX_MODEL_LEN)


def to_sampling_params(sampling: SamplingConfig, prompt_index: int = 0):
    """SamplingConfig -> vllm.SamplingParams of prompt i (seeded `sampling.prompt_seed(i)`)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        seed=sampling.prompt_seed(prompt_index),
        logprobs=0,  # only the sampled token's logprob
        flat_logprobs=True,  # primitive lists instead of one dict + Logprob object per token
        # vLLM would also detokenize every logprob token, one call per token; without stop strings
        # we skip its detokenizer (stop strings need it) and decode each completion once.
        detokenize=bool(sampling.stop),
    )


def to_vllm_prompt(prompt: str | list[int]):
    if isinstance(prompt, str):
        return prompt
    return {"prompt_token_ids": [int(t) for t in prompt]}


def _sampled_logprobs(logprobs, ids: list[int]) -> list[float]:
    """The sampled token's logprob at each position (vLLM puts the sampled token first)."""
    if logprobs is None or len(logprobs) != len(ids):
        raise RuntimeError("vLLM returned no per-token logprobs (SamplingParams.logprobs must be 0)")
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        starts = logprobs.start_indices
        if any(logprobs.token_ids[s] != t for s, t in zip(starts, ids)):
            raise RuntimeError("vLLM logprobs are not those of the sampled tokens")
        return [float(logprobs.logprobs[s]) for s in starts]
    return [float(step[t].logprob) for step, t in zip(logprobs, ids)]


def samples_from_outputs(outputs, weight_version: int) -> list[Sample]:
    """vllm RequestOutputs (one per prompt, in order) -> flat list of Samples."""
    samples = []
    for i, out in enumerate(outputs):
        prompt_ids = list(out.prompt_token_ids)
        for c in out.outputs:
            ids = list(c.token_ids)
            lps = _sampled_logprobs(c.logprobs, ids)
            reason = c.finish_reason or "length"
            samples.append(
                Sample(
                    prompt_index=i,
                    prompt_ids=prompt_ids,
                    completion_ids=ids,
                    text=c.text or "",
                    logprobs=lps,
                    finish_reason=reason,
                    weight_version=weight_version,
                )
            )
    return samples


class VLLMEngine:
    """Generation with an in-process `vllm.LLM`; weight updates through `weight_transport`.

    model: HF-format checkpoint directory (or hub name). On CPU the engine runs float32, eager,
    with `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (`kv_cache_gib`, default 1). Any other
    `vllm.LLM` keyword passes through `llm_kwargs`.

    weight_transport: "shm" (CPU / same host: chunked safetensors in /dev/shm, loaded by the worker
    extension; the default), or a backend of vLLM's weight-transfer API: "gloo" (TCP, ours:
    rollout/gloo_transfer.py), "nccl" (the trainer on another GPU) or "ipc" (CUDA IPC: the trainer on this engine's
    GPU, colocated).

    Build it under `if __name__ == "__main__":`: vLLM spawns its engine-core process.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_gib: float = 1,
        gpu_memory_utilization: float | None = None,
        tokenizer: str | None = None,
        weight_transport: str = "shm",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        transfer_timeout_s: float = 600.0,
        **llm_kwargs,
    ):
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
        if weight_transport == "ipc":
            # The CUDA-IPC handles reach the engine core inside collective_rpc arguments, which vLLM pickles only so
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM

        if weight_transport not in ("shm", "gloo", "nccl", "ipc"):
            raise ValueError(f"weight_transport must be 'shm', 'gloo', 'nccl' or 'ipc', got {weight_transport!r}")
        if llm_kwargs.get("logprobs_mode", LOGPROBS_MODE) != LOGPROBS_MODE:
            log.warning("logprobs_mode=%s: sample logprobs will not be the sampling distribution's", llm_kwargs["logprobs_mode"])
        llm_kwargs.setdefault("logprobs_mode", LOGPROBS_MODE)
        if weight_transport != "shm":
            from vllm.config import WeightTransferConfig

            from rollout.gloo_transfer import register

            register()  # this process; vLLM's own processes load it as a plugin (pyproject.toml)
            llm_kwargs.setdefault("weight_transfer_config", WeightTransferConfig(backend=weight_transport))
        if gpu_memory_utilization is not None:
            llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if on_cpu:
            # No prefill may be split across engine steps on CPU. vLLM samples a token for a partly prefilled request,
            # discards it and rewinds that request's seeded generator (`set_offset`), which CPU generators do not
            # support: the engine died ("CPU Generator does not use offset") as soon as one step's prompts exceeded the
            # default budget of 4096 tokens (e.g. 32 prompts x 8 samples x 20 tokens). A budget of every running
            # sequence at full length means no prompt is ever cut.
            max_model_len = max_model_len or cpu_context_length(model)
            llm_kwargs.setdefault("max_num_seqs", CPU_MAX_NUM_SEQS)
            llm_kwargs.setdefault("max_num_batched_tokens", llm_kwargs["max_num_seqs"] * max_model_len)
        self.model = str(model)
        self.llm = LLM(
            model=self.model,
            tokenizer=tokenizer,
            dtype=dtype or ("float32" if on_cpu else "bfloat16"),
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            max_model_len=max_model_len,
            worker_extension_cls=WORKER_EXTENSION,
            **llm_kwargs,
        )
        self.weight_version = 0
        self.weight_transport = weight_transport
        self._shm = ShmTransport(chunk_bytes=chunk_bytes)  # the workers load chunks from this host's shm directory only
        workers = self.llm.get_world_size(include_dp=True)  # vLLM workers that receive weights
        self._transfer = (TransferEngineTransport(weight_transport, LLMSyncClient(self.llm), 1 + workers,
                                                  timeout_s=transfer_timeout_s) if weight_transport != "shm" else None)

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        if not prompts:
            return []
        params = [to_sampling_params(sampling, i) for i in range(len(prompts))]
        outputs = self.llm.generate([to_vllm_prompt(p) for p in prompts], params, use_tqdm=False)
        samples = samples_from_outputs(outputs, self.weight_version)
        set_texts(self.llm.get_tokenizer(), samples, [c.stop_reason for out in outputs for c in out.outputs])
        return samples

    # ------------------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Load new weights (HF names) into the running engine and tag later samples with `version`."""
        if self._transfer is not None:
            stats = self._transfer.send(as_weight_source(named_tensors))
        else:
            try:
                stats = self._shm.send(
                    named_tensors,
                    begin=self.begin_weight_update,
                    load=self.load_weight_file,
                    finish=self._finish_reload,
                )
            except Exception:
                # Close the half-done reload session so the engine keeps serving (layers that got no
                # new weights keep their old ones); the version stays the old one.
                try:
                    self._finish_reload()
                except Exception as exc:
                    log.error("could not close the failed weight update: %s", exc)
                raise
        self._after_update(version)
        return stats

    def begin_weight_update(self) -> None:
        self.llm.collective_rpc("rollout_begin_reload")

    def load_weight_file(self, path: str, delete: bool = True) -> None:
        self.llm.collective_rpc("rollout_load_file", kwargs={"path": path, "delete": delete})

    def _finish_reload(self) -> None:
        self.llm.collective_rpc("rollout_finish_reload")

    def finish_weight_update(self, version: int) -> None:
        self._finish_reload()
        self._after_update(version)

    def sleep(self) -> None:
        """Free the GPU for training (needs enable_sleep_mode=True): level 2 drops the weights and the KV cache, keeping
        only the model's buffers (rotary caches) on the host. Level 1 would copy every weight to pinned host memory
        and back at each step, only for the next sync to overwrite them all."""
        self.llm.sleep(level=2)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Map memory back: `["weights"]` (the buffers are restored; the weights' contents are undefined until a sync
        writes them), then `["kv_cache"]`; None wakes both. vLLM generates only once both are awake."""
        self.llm.wake_up(tags)

    def _after_update(self, version: int) -> None:
        # Cached prefixes hold KV computed with the old weights.
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # best effort: the process may already be gone
            log.debug("vLLM shutdown: %s", exc)
        del llm
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

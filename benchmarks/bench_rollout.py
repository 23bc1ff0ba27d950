"""Rollout throughput and weight-sync cost.

For a tiny Llama (~0.2M parameters) and a ~100M-parameter random Llama, in one run:
  * tokens/s of VLLMEngine.generate vs raw vllm.LLM.generate (same engine, prompts, lengths, seeds;
    the raw call asks for no logprobs), and of HFEngine.generate for reference (a quarter of the
    prompts: batch size differs, so compare it loosely);
  * seconds (and GB/s) of VLLMEngine.update_weights (shm transport, fp32).

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/bench_rollout.py [--sizes tiny,100m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, intermediate)   head_dim is 64 (a CPU attention size)
    "tiny": (128, 2, 2, 256),
    "100m": (1024, 8, 16, 2816),
}


def make_model(out: Path, size: str, seed: int = 0) -> tuple[Path, int]:
    """A random Llama of `size` with a locally trained byte-level BPE tokenizer; returns (dir, #params)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = "the a cat dog sat on mat ran to park one two three four five plus minus equals is and".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(out)
    hidden, layers, heads, inter = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=64, max_position_embeddings=512,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def bench_size(size: str, workdir: Path, n_prompts: int, new_tokens: int, hf: bool) -> dict:
    from rollout import SamplingConfig
    from rollout.vllm_engine import VLLMEngine, to_sampling_params, to_vllm_prompt

    model_dir, n_params = make_model(workdir / size, size)
    words = "the a cat dog sat on mat ran to park one two three four five".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(4 + i % 5)) for i in range(n_prompts)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    row: dict = {"size": size, "params": n_params, "prompts": n_prompts, "max_new_tokens": new_tokens}

    t = time.perf_counter()
    engine = VLLMEngine(str(model_dir), max_model_len=512, seed=0)
    row["engine_start_s"] = round(time.perf_counter() - t, 1)
    try:
        # raw vllm.LLM.generate: same engine, same per-prompt SamplingParams, no logprobs requested
        raw_params = []
        for i in range(n_prompts):
            p = to_sampling_params(sampling, i)
            p.logprobs = None
            raw_params.append(p)
        raw_inputs = [to_vllm_prompt(p) for p in prompts]
        raw_s, raw_out = timed(lambda: engine.llm.generate(raw_inputs, raw_params, use_tqdm=False))
        raw_tokens = sum(len(c.token_ids) for o in raw_out for c in o.outputs)
        ours_s, samples = timed(lambda: engine.generate(prompts, sampling))
        ours_tokens = sum(len(s.completion_ids) for s in samples)
        row.update(
            raw_vllm_tok_s=round(raw_tokens / raw_s, 1), raw_vllm_s=round(raw_s, 3), raw_tokens=raw_tokens,
            engine_tok_s=round(ours_tokens / ours_s, 1), engine_s=round(ours_s, 3), engine_tokens=ours_tokens,
        )

        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        g = torch.Generator().manual_seed(1)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        syncs = [engine.update_weights(state.items(), version=v) for v in range(1, 4)]
        best = min(syncs, key=lambda s: s.seconds)
        row.update(sync_bytes=best.bytes, sync_s=round(best.seconds, 3),
                   sync_gb_s=round(best.bytes / best.seconds / 1e9, 2),
                   sync_s_all=[round(s.seconds, 3) for s in syncs])
    finally:
        engine.close()
    print(json.dumps(row), flush=True)

    if hf:  # transformers generate on a quarter of the prompts (it is slow at 100M), one timed call
        from rollout.hf_engine import HFEngine

        hf_engine = HFEngine(str(model_dir))
        hf_prompts = prompts[: max(1, len(prompts) // 4)]
        hf_engine.generate(hf_prompts[:2], SamplingConfig(max_new_tokens=4))  # warm-up
        t = time.perf_counter()
        hf_samples = hf_engine.generate(hf_prompts, sampling)
        hf_s = time.perf_counter() - t
        row["hf_tok_s"] = round(sum(len(s.completion_ids) for s in hf_samples) / hf_s, 1)
        hf_engine.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,100m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            row = bench_size(size, Path(tmp), args.prompts, args.new_tokens, hf=not args.no_hf)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'size':>6} {'params':>10} {'raw vLLM tok/s':>15} {'engine tok/s':>13} {'HF tok/s':>9} "
          f"{'sync MB':>8} {'sync s':>7} {'GB/s':>5}")
    for r in rows:
        print(f"{r['size']:>6} {r['params']:>10,} {r['raw_vllm_tok_s']:>15} {r['engine_tok_s']:>13} "
              f"{r.get('hf_tok_s', '-'):>9} {r['sync_bytes'] / 1e6:>8.1f} {r['sync_s']:>7} {r['sync_gb_s']:>5}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

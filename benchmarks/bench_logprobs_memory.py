"""Peak memory and time of the trainer's token log-probs + entropy at a real vocabulary: the chunked
`alignment.ppo.logprobs.token_logprobs` against the full-softmax computation it replaced.

One training micro-batch's worth: logits [B, T, V] as an LM head returns them (bf16 by default, requiring grad),
forward of log-probs and entropy, backward of a loss on both. Peak memory counts everything allocated beyond the
logits themselves (their gradient included, which any method needs). Each variant runs in a fresh process.

    python benchmarks/bench_logprobs_memory.py                       # CUDA if present, else CPU
    python benchmarks/bench_logprobs_memory.py --batch 4 --tokens 1024 --vocab 152064 --dtype bfloat16

On CUDA the peak is torch's allocator peak; on CPU it is the process's peak resident set (VmHWM) growth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def full_softmax(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """What `token_logprobs` computed before chunking: one log_softmax over [B, T, V] and the entropy from it."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def chunked(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    from alignment.ppo.logprobs import token_logprobs

    return token_logprobs(logits, targets, temperature, with_entropy=True)


def _resident_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(method: str, batch: int, tokens: int, vocab: int, dtype: str, device: str, repeats: int = 3) -> dict:
    """Peak memory beyond the logits over `repeats` forward + backward passes, and the fastest pass's seconds."""
    torch.manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, dtype=getattr(torch, dtype), device=device).requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, tokens), device=device)
    fn = {"full_softmax": full_softmax, "chunked": chunked}[method]
    fn(logits[:1, :8], targets[:1, :8], 1.0)  # warm-up (kernels, imports)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _resident_peak_bytes()
    times = []
    for _ in range(repeats):
        logits.grad = None
        start = time.perf_counter()
        logp, entropy = fn(logits, targets, 0.7)
        (logp.sum() + 0.01 * entropy.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del logp, entropy
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _resident_peak_bytes()) - base
    return {"method": method, "seconds": min(times), "peak_extra_bytes": peak,
            "logits_bytes": logits.numel() * logits.element_size()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    shape = dict(batch=args.batch, tokens=args.tokens, vocab=args.vocab, dtype=args.dtype, device=args.device)
    if args.one:
        print(json.dumps(measure(args.one, **shape)))
        return
    rows = []
    for method in ("full_softmax", "chunked"):
        cmd = [sys.executable, __file__, "--one", method] + [f"--{k}={v}" for k, v in shape.items()]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    gib = 1024**3
    print(f"logits [{args.batch}, {args.tokens}, {args.vocab}] {args.dtype} on {args.device}: "
          f"{rows[0]['logits_bytes'] / gib:.2f} GiB")
    print(f"{'method':<14}{'peak beyond the logits':>24}{'x logits':>10}{'best s':>10}")
    for r in rows:
        print(f"{r['method']:<14}{r['peak_extra_bytes'] / gib:>20.2f} GiB{r['peak_extra_bytes'] / r['logits_bytes']:>10.2f}"
              f"{r['seconds']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "results": rows}, indent=2))


if __name__ == "__main__":
    main()

"""`alignment rollout serve`: a rollout server on devices reserved for it.

With the vLLM engine (the default) this is vLLM's own OpenAI server (`vllm serve`), started with the flags PPO
needs, and nothing of ours in between; a user may run the same command anywhere (`--print-command` shows it):

- `--logprobs-mode processed_logprobs`: each sampled token's log-prob under the distribution it was drawn from
  (temperature and top-k/p applied); vLLM's default ignores the temperature and would bias every importance ratio;
- `--generation-config vllm`: the model's generation_config.json must not add its defaults (e.g. a repetition
  penalty) to our sampling settings;
- `--weight-transfer-config {"backend": "gloo" | "nccl"}` and `VLLM_SERVER_DEV_MODE=1`: vLLM's weight-transfer
  routes (`/init_weight_transfer_engine`, `/start_weight_update`, ...); "gloo" is ours, loaded by our vLLM plugin;
- `--worker-extension-cls rollout.worker_extension.WeightSyncExtension`: the /dev/shm route (`/collective_rpc`),
  for a trainer on the same host;
- `--middleware rollout.auth.RolloutAuthMiddleware`: every route but /health needs the shared secret of
  ALIGNMENT_ROLLOUT_SECRET (read from the server's environment, never put on the command line); without one the
  server answers its own host only, and this command refuses to listen beyond loopback (rollout/auth.py);
- on CPU: eager mode, float32 and prefills never split (see rollout.vllm_engine).

`--engine hf` serves transformers' generate behind our small JSON server instead (rollout/server.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

from rollout.auth import check_secret, rollout_secret
from rollout.vllm_engine import CPU_MAX_NUM_SEQS, LOGPROBS_MODE, WORKER_EXTENSION, cpu_context_length

AUTH_MIDDLEWARE = "rollout.auth.RolloutAuthMiddleware"


def add_serve_arguments(ap: argparse.ArgumentParser) -> None:
    """The server's options. Defaults suit the device: on GPUs bf16 and the model's own context length, on CPU float32
    and 1024 tokens."""
    ap.add_argument("--model", required=True, help="HF-format checkpoint directory or hub name")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from other hosts)")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--devices", default=None, help="GPU ids reserved for this server (sets CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                    help="vllm: vLLM's OpenAI server; hf: transformers generate behind a small JSON server (slow)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights dtype (default: bfloat16 on GPUs, float32 on CPU); match the trainer for exact log-probs")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="context length (default: the model's own on GPUs, at most 1024 on CPU)")
    ap.add_argument("--tensor-parallel-size", type=int, default=None,
                    help="GPUs one model replica is split over (default: every device in --devices)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-sync", choices=["gloo", "nccl"], default="gloo",
                    help="backend of vLLM's weight-transfer API the trainer drives: gloo (TCP, any host) or nccl "
                    "(GPUs); a trainer on this host may also use /dev/shm (rollout.weight_sync: shm)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="share of each GPU vLLM may take (default: vLLM's 0.9)")
    ap.add_argument("--print-command", action="store_true", help="print the vLLM server command and exit")
    ap.epilog = ("Any other option is passed to vLLM's server as it is (e.g. --max-num-seqs 64, --load-format dummy); "
                 "where it repeats one set here, vLLM takes the last, the one given.")


def vllm_server_command(args: argparse.Namespace, on_cpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The stock vLLM OpenAI server command for `args` (its `vllm_args` appended as given), and the environment
    variables it needs."""
    on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--host", args.host, "--port", str(args.port), "--seed", str(args.seed),
           "--dtype", args.dtype or ("float32" if on_cpu else "bfloat16"),
           "--logprobs-mode", LOGPROBS_MODE, "--generation-config", "vllm",
           "--weight-transfer-config", json.dumps({"backend": args.weight_sync}),
           "--worker-extension-cls", WORKER_EXTENSION, "--middleware", AUTH_MIDDLEWARE, "--disable-uvicorn-access-log"]
    extra = list(getattr(args, "vllm_args", None) or [])
    max_model_len = args.max_model_len or (cpu_context_length(args.model) if on_cpu else None)
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if on_cpu:  # a budget of every sequence at full length: no prefill is ever split (see rollout.vllm_engine)
        max_num_seqs = int(_flag_value(extra, "--max-num-seqs") or CPU_MAX_NUM_SEQS)
        cmd += ["--enforce-eager", "--max-num-seqs", str(max_num_seqs),
                "--max-num-batched-tokens", str(max_num_seqs * max_model_len)]
    tp = args.tensor_parallel_size or (len(args.devices.split(",")) if args.devices else 1)
    if tp > 1:
        cmd += ["--tensor-parallel-size", str(tp)]
    if args.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if args.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.devices
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    return cmd + extra, env


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to `flag` in `argv` (`--flag value` or `--flag=value`)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def serve_from_args(args: argparse.Namespace) -> None:
    if not args.print_command:  # the printed command may be run elsewhere, where the secret is set
        check_secret(rollout_secret(), args.host)
    if args.engine == "hf":
        if getattr(args, "vllm_args", None):
            from alignment.errors import UserError

            raise UserError(f"unrecognized arguments for --engine hf: {' '.join(args.vllm_args)} (options other than "
                            "those listed in --help pass through to vLLM's server only)")
        from rollout.server import serve

        if args.devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
        serve(args.model, args.host, args.port, seed=args.seed, dtype=args.dtype)
        return
    cmd, env = vllm_server_command(args)
    if args.print_command:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
        return
    print(f"rollout server: vLLM's OpenAI server on http://{args.host}:{args.port}", flush=True)
    # The server replaces this process: a launcher's signals (and the parent-death signal, which survives exec) reach
    # vLLM's server directly, which stops its engine processes on SIGTERM.
    os.execve(sys.executable, cmd, {**os.environ, **env})

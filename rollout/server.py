"""Rollout server: one engine (vLLM by default) behind JSON over HTTP (`alignment rollout serve`).

Endpoints (all JSON):
  GET  /health          -> {"status": "ok", "model": ..., "weight_version": int, "updating": bool}
  POST /generate        {"prompts": [str | [int]], "sampling": SamplingConfig fields}
                        -> {"samples": [Sample fields], "weight_version": int}
  POST /update_weights  {"paths": [safetensors files on this host], "version": int,
                         "begin": bool = true, "finish": bool = true, "delete": bool = false}
                        -> {"weight_version": int, "bytes": int, "seconds": float}
     One call with begin and finish loads a whole set of files. A chunked sync sends
     begin (maybe with the first paths), then more paths, then finish with the version; /generate
     answers 409 while such an update is open.

vLLM's weight-transfer routes, as a stock `vllm serve` in dev mode has them (so vLLM's HTTP client drives both),
for engines started with a transfer backend (`--weight-sync gloo`, the default, or `nccl`):
  GET  /get_world_size                -> {"world_size": workers that receive weights}
  POST /init_weight_transfer_engine   {"init_info": {...}}   join the trainer's transfer group
  POST /start_weight_update           {}                     open a layerwise reload
  POST /update_weights                {"update_info": {...}} receive one round (blocks until received)
  POST /finish_weight_update          {"weight_version": str} close it
  POST /update_weight_version         {"weight_version": str} later samples carry that version

Run: `python -m rollout.server --model DIR --port 8000` (loopback by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rollout.types import SamplingConfig

log = logging.getLogger(__name__)


class _State:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.lock = threading.Lock()  # one engine call at a time
        self.updating = False


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route through logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        st = self.state
        if self.path.startswith("/get_world_size"):
            self._reply(200, {"world_size": self._sync_engine().world_size})
        elif self.path == "/health":
            self._reply(
                200,
                {
                    "status": "ok",
                    "model": st.model_name,
                    "weight_version": st.engine.weight_version,
                    "updating": st.updating,
                },
            )
        else:
            self._reply(404, {"error": f"no route GET {self.path}"})

    def do_POST(self):
        try:
            body = self._body()
        except (ValueError, json.JSONDecodeError) as exc:
            self._reply(400, {"error": f"bad JSON: {exc}"})
            return
        try:
            if self.path == "/generate":
                self._generate(body)
            elif self.path == "/update_weights" and "update_info" in body:
                self._transfer("update", body)
            elif self.path == "/update_weights":
                self._update_weights(body)
            elif self.path in ("/init_weight_transfer_engine", "/start_weight_update", "/finish_weight_update"):
                self._transfer(self.path.strip("/").split("_")[0], body)
            elif self.path == "/update_weight_version":
                with self.state.lock:
                    self.state.engine.weight_version = int(body["weight_version"])
                self._reply(200, {"weight_version": self.state.engine.weight_version})
            else:
                self._reply(404, {"error": f"no route POST {self.path}"})
        except (KeyError, TypeError, ValueError) as exc:
            self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # engine failure: report it, keep serving
            log.exception("rollout server error on %s", self.path)
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _generate(self, body: dict) -> None:
        st = self.state
        prompts = body["prompts"]
        sampling = SamplingConfig.from_dict(body.get("sampling") or {})
        with st.lock:
            if st.updating:
                self._reply(409, {"error": "a weight update is in progress"})
                return
            samples = st.engine.generate(prompts, sampling)
            version = st.engine.weight_version
        self._reply(200, {"samples": [s.to_dict() for s in samples], "weight_version": version})

    def _sync_engine(self):
        engine = self.state.engine
        if getattr(engine, "_transfer", None) is None:
            raise ValueError("this server's engine has no weight-transfer backend (start it with --weight-sync gloo or nccl)")
        return engine

    def _transfer(self, step: str, body: dict) -> None:
        """One step of vLLM's weight-transfer lifecycle. `init` and `update` block in the transfer's collectives
        until the trainer's side joins; generation answers 409 from start to finish."""
        st = self.state
        engine = self._sync_engine()
        client = engine.sync_client
        if step == "init":
            client.init_weight_transfer_engine(body["init_info"])
        elif step == "start":
            with st.lock:
                client.start_weight_update()
                st.updating = True
        elif step == "update":
            try:
                client.update_weights(body["update_info"])
            except Exception:
                st.updating = False
                raise
        else:
            with st.lock:
                st.updating = False
                engine.finish_transfer(int(body.get("weight_version") or engine.weight_version))
        self._reply(200, {"weight_version": engine.weight_version})

    def _update_weights(self, body: dict) -> None:
        st = self.state
        paths = [str(p) for p in body.get("paths") or []]
        begin = bool(body.get("begin", True))
        finish = bool(body.get("finish", True))
        delete = bool(body.get("delete", False))
        if finish and "version" not in body:
            raise ValueError("update_weights: 'version' is required to finish an update")
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"update_weights: no such file on the server's host: {p} (a server on another host, or "
                                 "in a container without the trainer's /dev/shm, needs rollout.weight_sync: gloo)")
        start = time.perf_counter()
        nbytes = sum(os.path.getsize(p) for p in paths)
        with st.lock:
            if begin:
                st.engine.begin_weight_update()
                st.updating = True
            elif not st.updating:
                raise ValueError("update_weights: no update in progress (send begin=true first)")
            try:
                for p in paths:
                    st.engine.load_weight_file(p, delete=delete)
                if finish:
                    st.engine.finish_weight_update(int(body["version"]))
                    st.updating = False
            except Exception:
                st.updating = False
                raise
            version = st.engine.weight_version
        self._reply(200, {"weight_version": version, "bytes": nbytes, "seconds": time.perf_counter() - start})


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "") -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) around an existing engine; `port=0` picks a free port."""
    handler = type("RolloutHandler", (_Handler,), {"state": _State(engine, model_name)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def build_engine(model: str, engine: str = "vllm", **engine_kwargs):
    if engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, **engine_kwargs)
    if engine == "hf":
        from rollout.hf_engine import HFEngine

        return HFEngine(model, **engine_kwargs)
    raise ValueError(f"engine must be 'vllm' or 'hf', got {engine!r}")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, engine: str = "vllm", **engine_kwargs) -> None:
    """Start an engine on `model` and serve it until interrupted (blocking)."""
    eng = build_engine(model, engine, **engine_kwargs)
    server = make_server(eng, host, port, model_name=str(model))
    # `kill` (SIGTERM) must also stop the engine's own processes (vLLM's engine core and workers), which
    # would otherwise outlive the server holding gigabytes: turn it into the KeyboardInterrupt handled below.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    log.warning("rollout server for %s listening on http://%s:%d", model, host, server.server_address[1])
    print(f"rollout server ready on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        eng.close()


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def add_serve_arguments(ap: argparse.ArgumentParser) -> None:
    """The server's options (`alignment rollout serve` and `python -m rollout.server`). Defaults suit the device:
    on GPUs bf16 and the model's own context length, on CPU float32 and 1024 tokens."""
    ap.add_argument("--model", required=True, help="HF-format checkpoint directory or hub name")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from other hosts)")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--devices", default=None, help="GPU ids reserved for this server (sets CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights dtype (default: bfloat16 on GPUs, float32 on CPU); match the trainer for exact log-probs")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="context length (default: the model's own on GPUs, 1024 on CPU)")
    ap.add_argument("--tensor-parallel-size", type=int, default=None,
                    help="GPUs one model replica is split over (default: every device in --devices)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-sync", choices=["gloo", "nccl", "shm"], default="gloo",
                    help="weight-transfer backend the trainer drives through the vLLM routes: gloo (TCP, any host) or "
                    "nccl (GPUs); the /dev/shm route works with any")


def serve_from_args(args: argparse.Namespace) -> None:
    if args.devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
    kwargs = {"seed": args.seed, "dtype": args.dtype}
    if args.engine == "vllm":
        kwargs["max_model_len"] = args.max_model_len
        kwargs["weight_transport"] = args.weight_sync
        tp = args.tensor_parallel_size or (len(args.devices.split(",")) if args.devices else 1)
        if tp > 1:
            kwargs["tensor_parallel_size"] = tp
    serve(args.model, args.host, args.port, engine=args.engine, **kwargs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rollout.server", description=__doc__.splitlines()[0])
    add_serve_arguments(ap)
    serve_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    main()

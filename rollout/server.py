"""A small JSON-over-HTTP rollout server around an engine that is not vLLM (`alignment rollout serve --engine hf`:
transformers' generate). With vLLM, `alignment rollout serve` runs vLLM's own OpenAI server instead (rollout/serve.py).

Endpoints (all JSON):
  GET  /health          -> {"status": "ok", "model": ..., "weight_version": int, "updating": bool}
  POST /generate        {"prompts": [str | [int]], "sampling": SamplingConfig fields}
                        -> {"samples": [Sample fields], "weight_version": int}
  POST /update_weights  {"paths": [safetensors files on this host], "version": int,
                         "begin": bool = true, "finish": bool = true, "delete": bool = false}
                        -> {"weight_version": int, "bytes": int, "seconds": float}
     One call with begin and finish loads a whole set of files. A chunked sync sends
     begin (maybe with the first paths), then more paths, then finish with the version; /generate
     answers 409 while such an update is open. Only the shm transport's chunk files in this host's shm directory are
     loaded (`rollout.weight_sync.check_chunk_path`).

Every route but /health needs the shared secret of ALIGNMENT_ROLLOUT_SECRET (`Authorization: Bearer`), or, without
one, a client on this host (rollout/auth.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rollout.auth import authorized, refusal, rollout_secret
from rollout.types import SamplingConfig
from rollout.weight_sync import check_chunk_path

log = logging.getLogger(__name__)


class _State:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.secret = rollout_secret()
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

    def _refused(self) -> bool:
        """Answer a request that may not pass (see rollout.auth) and say so."""
        if authorized(self.headers.get("Authorization"), self.client_address[0], self.state.secret):
            return False
        self._reply(*refusal(self.state.secret))
        return True

    def do_GET(self):
        st = self.state
        if self.path != "/health" and self._refused():
            return
        if self.path == "/health":
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
        if self._refused():
            return
        try:
            body = self._body()
        except (ValueError, json.JSONDecodeError) as exc:
            self._reply(400, {"error": f"bad JSON: {exc}"})
            return
        try:
            if self.path == "/generate":
                self._generate(body)
            elif self.path == "/update_weights":
                self._update_weights(body)
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

    def _update_weights(self, body: dict) -> None:
        st = self.state
        paths = [str(p) for p in body.get("paths") or []]
        begin = bool(body.get("begin", True))
        finish = bool(body.get("finish", True))
        delete = bool(body.get("delete", False))
        if finish and "version" not in body:
            raise ValueError("update_weights: 'version' is required to finish an update")
        for p in paths:
            check_chunk_path(p)
            if not os.path.isfile(p):
                raise ValueError(f"update_weights: no such file on the server's host: {p} (a server on another host, or "
                                 "in a container without the trainer's /dev/shm, needs a vLLM server and rollout.weight_sync: gloo)")
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


def serve(model: str, host: str = "127.0.0.1", port: int = 8100, **engine_kwargs) -> None:
    """Start an HF engine on `model` and serve it until interrupted (blocking)."""
    from rollout.hf_engine import HFEngine

    eng = HFEngine(model, **engine_kwargs)
    server = make_server(eng, host, port, model_name=str(model))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` closes the engine too
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

"""Methods mixed into every vLLM worker (`LLM(worker_extension_cls="rollout.worker_extension.WeightSyncExtension")`).

vLLM merges this class into its worker class, so `self` is the worker: `self.model_runner` holds the
model. The trainer side calls these through `LLM.collective_rpc("<method name>", kwargs=...)`; a
class path string needs no `VLLM_ALLOW_INSECURE_SERIALIZATION`.

Loading must go through vLLM's layerwise reload lifecycle (begin, any number of `load_weights`
calls, finish): on CPU in float32 the backend repacks each linear weight into a oneDNN handle and
leaves an empty parameter behind, so a bare `model.load_weights` fails.
"""

from __future__ import annotations

import os


class WeightSyncExtension:
    """Worker-side half of the shm weight sync (see rollout.weight_sync.ShmTransport)."""

    def rollout_begin_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())
        self._rollout_loaded = 0

    def rollout_load_file(self, path: str, delete: bool = True) -> int:
        """Load one safetensors chunk of the shm transport into the model (inside a reload session), then delete it if
        asked; returns the tensor count. Any other path is refused before anything is read or removed."""
        from safetensors.torch import load_file

        from rollout.weight_sync import check_chunk_path

        path = check_chunk_path(path)
        try:
            tensors = load_file(path)
        finally:
            if delete and os.path.exists(path):
                os.remove(path)
        self.model_runner.get_model().load_weights(weights=list(tensors.items()))
        self._rollout_loaded = getattr(self, "_rollout_loaded", 0) + len(tensors)
        return len(tensors)

    def rollout_finish_reload(self) -> int:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_runner.model_config)
        reprocess_shared_weight_layers(model)
        loaded, self._rollout_loaded = getattr(self, "_rollout_loaded", 0), 0
        return loaded

    def rollout_param_names(self) -> list[str]:
        return [n for n, _ in self.model_runner.get_model().named_parameters()]


def reprocess_shared_weight_layers(model) -> None:
    """Re-run weight post-processing on every layer that shares a parameter with another layer.

    Layerwise reload processes a layer after its own weights arrive. A layer whose weight is another layer's
    (tied input/output embeddings: vLLM's lm_head holds `embed_tokens.weight`) gets no weights of its own (the
    checkpoint has no separate lm_head), so whatever its quantisation method derived from the weight at start-up
    stays stale. On CPU that is the oneDNN-packed copy the logits are computed from: the engine went on sampling
    from the initial head while the embeddings changed (token_mult_prob_error 1.1-1.7 after a sync). Processing
    these layers again derives their kernels from the shared, now updated, weight.
    """
    owners: dict[int, list] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    shared = {id(m): m for modules in owners.values() if len(modules) > 1 for m in modules}
    for module in shared.values():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)

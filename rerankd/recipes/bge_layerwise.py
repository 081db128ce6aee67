"""bge-reranker-v2-minicpm-layerwise: FlagEmbedding's layerwise reranker prompt, scored by the
head of a chosen layer.

The prompt is the decoder-only one of bge-reranker-v2-gemma (recipes/bge_gemma.py), token for
token, as FlagEmbedding's `LayerWiseFlagLLMReranker.compute_score` builds it: ``[bos] +
encode("A: " + query)[:3L/4]``, then ``"\\n" + encode("B: " + passage)[:L]`` cut from its end
to fit ``L + len(sep) + len(prompt)``, then ``"\\n" + prompt``; L = 512. One difference from
the Gemma reranker: the BOS token is always prepended (that one checks it differs from pad).

The score is the raw output of one layer's head (`ScoreHead` kind ``layers``): the checkpoint
has a head for each layer from `start_layer` (8) to the last (40). Which layer:
- the request's `cutoff_layers` (an int, or a list as FlagEmbedding takes it), else
- the server's `--cutoff-layers`, else
- the last layer, FlagEmbedding's default when `cutoff_layers` is not given.
For a list, FlagEmbedding's `compute_score` returns one score list per layer; the rerank API
has one score per document, so rerankd returns the *deepest* listed layer's (the reference's
last list) and computes nothing past it. A layer without a head is a 400 naming the field
(FlagEmbedding drops such layers with a warning and fails only when none is left).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from rerankd.errors import InvalidRequest
from rerankd.recipes.base import ScoreHead
from rerankd.recipes.bge_gemma import BgeGemmaReranker
from rerankd.types import EncodedPair, LayerwisePair


class BgeLayerwiseReranker(BgeGemmaReranker):
    name = "bge-layerwise"
    architectures = ("LayerWiseMiniCPMForCausalLM",)

    def __init__(self, tokenizer, config, max_model_len: int | None = None) -> None:
        super().__init__(tokenizer, config, max_model_len)
        bos = tokenizer.bos_token_id  # FlagEmbedding: [bos_token_id] + query, unconditionally
        self.bos_ids = [bos] if bos is not None else []
        self.num_layers = int(config.num_hidden_layers)
        self.start_layer = int(getattr(config, "start_layer", 8))
        #: the layer a pair is scored after when its request names none (`set_default_layer`)
        self.default_layer = self.num_layers

    @property
    def head(self) -> ScoreHead:
        return ScoreHead(kind="layers")

    @property
    def layers(self) -> range:
        """The layers that have a score head."""
        return range(self.start_layer, self.num_layers + 1)

    def layer_of(self, cutoff_layers: int | Sequence[int], param: str = "cutoff_layers") -> int:
        """The layer a request's `cutoff_layers` scores after (the deepest of a list), or a
        400 naming `param`."""
        listed = [cutoff_layers] if isinstance(cutoff_layers, int) else list(cutoff_layers)
        span = f"{self.start_layer} to {self.num_layers}"
        if not listed:
            raise InvalidRequest(f"{param} is empty; give a layer from {span}", param=param)
        for layer in listed:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise InvalidRequest(f"{param} must be integers, got {layer!r}", param=param)
            if layer not in self.layers:
                raise InvalidRequest(
                    f"{param}: layer {layer} has no score head; this model scores after "
                    f"layers {span} (default {self.default_layer})",
                    param=param,
                )
        return max(listed)

    def set_default_layer(self, cutoff_layers: int | Sequence[int]) -> None:
        """The server's default layer (`--cutoff-layers`), checked like a request's."""
        self.default_layer = self.layer_of(cutoff_layers, param="--cutoff-layers")

    def at_layer(self, pairs: Sequence[EncodedPair], layer: int) -> list[EncodedPair]:
        """`pairs` scored after `layer` instead (a request's `cutoff_layers`)."""
        return [replace(pair, layer=layer) for pair in pairs]

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        pairs = super()._encode_pairs(queries, documents, instruction, side)
        return [
            LayerwisePair(pair.input_ids, None, pair.cut_tokens, layer=self.default_layer)
            for pair in pairs
        ]

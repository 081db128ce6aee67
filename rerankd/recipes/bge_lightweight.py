"""bge-reranker-v2.5-gemma2-lightweight: FlagEmbedding's `LightWeightFlagLLMReranker` recipe
(prompt, token compression, layer cutoff), scored by a per-layer head.

Tokens, as the reference's `compute_score` builds them (the layerwise recipe's, token for
token, recipes/bge_layerwise.py): ``[bos] + encode("A: " + query)[:3L/4]``, then
``"\\n" + encode("B: " + passage)[:L]`` cut from its end to fit ``L + len(sep) + len(prompt)``,
then ``"\\n" + prompt``, with BOS always; L = 512. The prompt is this model's own default,
``Predict whether passage B contains an answer to query A.`` (not bge-gemma's); a request's
`instruction` replaces it (``""``: no prompt, the ids end with the pair's "\\n", as the
reference's ``prompt=""``). The model reads the layout: the *query* part is bos + query + "\\n"
and the *prompt* part "\\n" + prompt (FlagEmbedding's `query_lengths`/`prompt_lengths`), the
passage lies between: only the passage is compressed.

Options (request fields; server flags set the defaults; the defaults are the model card's):
- `cutoff_layers` (int or list; default [28], `--cutoff-layers`): the score is read after the
  deepest listed layer. The reference's quirk: the head that scores is `lm_head[k]`, k being
  the rank of that layer among the distinct listed layers, not the layer's own head. So
  ``[28]`` is scored by head 0 (trained after layer `start_layer` = 8), ``[10, 28]`` by head 1,
  and the reference's own default (no cutoff: the last layer) by head 0 too. (A checkpoint
  without a head after layer 28 defaults to its last layer, the reference's default.)
  FlagEmbedding returns one score list per listed layer; the rerank API has one score per
  document, so rerankd returns the deepest layer's (the reference's last list) and computes
  nothing past it.
- `compress_ratio` (int >= 1; default 2, `--compress-ratio`): passage tokens per pooled token
  (1: no compression; the reference documents 1, 2, 4, 8 and computes any positive ratio).
- `compress_layers` (list; default [24, 40], `--compress-layers`): before which layers the
  passage is pooled (again at each). Compression runs before layers 1 to num_layers - 1; as
  in the reference, 0 and num_layers are accepted and do nothing (it skips 0 and never
  reaches num_layers), and so does a layer at or past the scoring layer (the score is read
  first); a layer outside 0..num_layers, which the reference would ignore as silently, is a
  400 here.
Any other value is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from rerankd.errors import InvalidRequest
from rerankd.recipes.bge_layerwise import BgeLayerwiseReranker
from rerankd.types import EncodedPair, LayerwisePair

DEFAULT_PROMPT = "Predict whether passage B contains an answer to query A."
#: the model card's parameters (BAAI/bge-reranker-v2.5-gemma2-lightweight's README)
CARD_CUTOFF_LAYERS = (28,)
CARD_COMPRESS_RATIO = 2
CARD_COMPRESS_LAYERS = (24, 40)


@dataclass(frozen=True)
class Compression:
    """What a request (or the server's defaults) asks of the model: the layer scored after,
    the head that scores it, and the passage compression."""

    layer: int
    head: int = 0
    ratio: int = 1
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class LightweightPair(LayerwisePair):
    """A pair with the layout the model compresses by: `query_length` (bos + query + sep)
    and `prompt_length` (sep + prompt) tokens; the passage lies between. `options`: the
    layer, head and compression it is scored with."""

    query_length: int = 0
    prompt_length: int = 0
    options: Compression | None = None


class BgeLightweightReranker(BgeLayerwiseReranker):
    name = "bge-lightweight"
    architectures = ("CostWiseGemmaForCausalLM",)
    #: accepts `compress_ratio` / `compress_layers` (service.py asks)
    compresses = True

    def __init__(self, tokenizer, config, max_model_len: int | None = None) -> None:
        super().__init__(tokenizer, config, max_model_len)
        self.default_prompt_ids = self.encode_text(DEFAULT_PROMPT)
        self.layer_sep = int(getattr(config, "layer_sep", 28))  # CostWiseGemmaConfig defaults
        self.start_layer = int(getattr(config, "start_layer", 28))
        card = [layer for layer in CARD_CUTOFF_LAYERS if layer in self.layers]
        self.defaults = Compression(layer=self.num_layers)
        self.defaults = self.options(
            card or [self.num_layers],
            CARD_COMPRESS_RATIO,
            [layer for layer in CARD_COMPRESS_LAYERS if layer < self.num_layers],
        )
        self.default_layer = self.defaults.layer

    @property
    def layers(self) -> range:
        return range(self.start_layer, self.num_layers + 1, self.layer_sep)

    # --- options -----------------------------------------------------------------------------

    def options(
        self,
        cutoff_layers: int | Sequence[int] | None = None,
        compress_ratio: int | None = None,
        compress_layers: Sequence[int] | None = None,
        flags: bool = False,
    ) -> Compression:
        """The request's options over the server's defaults, or a 400 naming the field
        (`flags`: name the server's flags instead)."""
        d = self.defaults
        layer, head = d.layer, d.head
        if cutoff_layers is not None:
            param = "--cutoff-layers" if flags else "cutoff_layers"
            listed = sorted(set(self._layers_of(cutoff_layers, param)))
            layer, head = listed[-1], len(listed) - 1
        ratio = d.ratio if compress_ratio is None else compress_ratio
        param = "--compress-ratio" if flags else "compress_ratio"
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise InvalidRequest(
                f"{param} must be an integer >= 1 (1: no compression), got {ratio!r}",
                param=param,
            )
        layers = d.layers if compress_layers is None else compress_layers
        param = "--compress-layers" if flags else "compress_layers"
        if isinstance(layers, int | str) or not isinstance(layers, Sequence):
            raise InvalidRequest(f"{param} must be a list of layers, got {layers!r}", param=param)
        for value in layers:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{param} must be integers, got {value!r}", param=param)
            if not 0 <= value <= self.num_layers:
                raise InvalidRequest(
                    f"{param}: layer {value} is not a layer of this model (0 to "
                    f"{self.num_layers}; compression runs before layers 1 to "
                    f"{self.num_layers - 1})",
                    param=param,
                )
        return Compression(layer, head, ratio, tuple(sorted(set(layers))))

    def _layers_of(self, cutoff_layers, param: str) -> list[int]:
        listed = [cutoff_layers] if isinstance(cutoff_layers, int) else cutoff_layers
        if isinstance(listed, str) or not isinstance(listed, Sequence):
            raise InvalidRequest(f"{param} must be integers, got {cutoff_layers!r}", param=param)
        if not listed:
            raise InvalidRequest(
                f"{param} is empty; give a layer from {self.start_layer} to {self.num_layers}",
                param=param,
            )
        for value in listed:
            self.layer_of(value, param=param)  # the layerwise recipe's check, one layer
        return list(listed)

    def layer_of(self, cutoff_layers, param: str = "cutoff_layers", **compression):
        """One layer's check (the layerwise recipe's), or, with compression options, the
        request's whole `Compression` (service.py passes them)."""
        if compression or not isinstance(cutoff_layers, int):
            return self.options(cutoff_layers, **compression)
        return super().layer_of(cutoff_layers, param=param)

    def set_default_layer(self, cutoff_layers: int | Sequence[int]) -> None:
        """`--cutoff-layers`: the layer and head of requests that name none."""
        chosen = self.options(cutoff_layers, flags=True)
        self.defaults = replace(self.defaults, layer=chosen.layer, head=chosen.head)
        self.default_layer = self.defaults.layer

    def set_default_compression(
        self, compress_ratio: int | None, compress_layers: Sequence[int] | None
    ) -> None:
        """`--compress-ratio` / `--compress-layers`: the compression of requests that name none."""
        chosen = self.options(None, compress_ratio, compress_layers, flags=True)
        self.defaults = replace(self.defaults, ratio=chosen.ratio, layers=chosen.layers)

    def at_layer(self, pairs: Sequence[EncodedPair], options) -> list[EncodedPair]:
        """`pairs` scored with a request's options (`options`: a `Compression`, or a layer)."""
        if isinstance(options, int):
            options = self.options(options)
        return [replace(pair, layer=options.layer, options=options) for pair in pairs]

    # --- tokens ------------------------------------------------------------------------------

    def _encode_pairs(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None,
        side: str = "right",
    ) -> list[EncodedPair]:
        pairs = super()._encode_pairs(queries, documents, instruction, side)
        prompt = len(self.sep_ids) + len(
            self.encode_text(instruction) if instruction is not None else self.default_prompt_ids
        )
        unique = list(dict.fromkeys(queries))
        cap = self.max_length * 3 // 4
        query = {
            q: len(self.bos_ids) + min(len(ids), cap) + len(self.sep_ids)
            for q, ids in zip(unique, self.encode_texts([f"A: {q}" for q in unique]), strict=True)
        }
        return [
            LightweightPair(
                pair.input_ids,
                None,
                pair.cut_tokens,
                layer=self.defaults.layer,
                query_length=query[q],
                prompt_length=prompt,
                options=self.defaults,
            )
            for pair, q in zip(pairs, queries, strict=True)
        ]

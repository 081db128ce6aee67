"""Seeded reranking workloads for the CPU benchmarks (DESIGN.md §5, W-CPU).

W-CPU: 4 queries × 16 documents of 60–240 words (uniform), English-like text generated from
a seeded random stream. With the Qwen3-Reranker prompt this is ~233 tokens per pair, ~73 of
them the template + instruction + query prefix that every pair of a request shares
(:func:`describe` measures both with the checkpoint's own tokenizer; run this module to print
them).

The text generator is also the training corpus of the benchmark tokenizer
(``benchmarks/make_model.py``): common English words drawn with Zipf frequencies, inflected
forms, and a long tail of rare made-up words (names, jargon) that a BPE vocabulary only
covers in pieces, as real English splits under Qwen's tokenizer.

Nothing here imports torch or rerankd: the workload is plain strings.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass
from itertools import accumulate

__all__ = [
    "DEFAULT_INSTRUCTION",
    "QWEN3_PREFIX",
    "QWEN3_SUFFIX",
    "Request",
    "corpus",
    "describe",
    "qwen3_pair_ids",
    "short_request",
    "sweep_request",
    "w_cpu",
]

# ---------------------------------------------------------------------------------------------
# The Qwen3-Reranker prompt (model card), used only to *count* tokens here
# ---------------------------------------------------------------------------------------------

QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def qwen3_pair_ids(tokenizer, query: str, document: str, instruction: str = DEFAULT_INSTRUCTION):
    """Token ids of one pair, built as the model card builds them (segments encoded apart)."""
    body = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    enc = tokenizer.encode
    return (
        enc(QWEN3_PREFIX, add_special_tokens=False)
        + enc(body, add_special_tokens=False)
        + enc(QWEN3_SUFFIX, add_special_tokens=False)
    )


# ---------------------------------------------------------------------------------------------
# Text generator
# ---------------------------------------------------------------------------------------------


# ~600 frequent English words, roughly most frequent first (rank sets the Zipf weight).
def _words(text: str) -> list[str]:
    return text.split()


_COMMON = _words(
    """
the of and to a in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if will more no
out so up said what its about than into them can only other new some could time these two may
then do first any my now such like our over man me even most made after also did many before
must through back years where much your way well down should because each just those people
how too little state good very make world still own see men work long get here between both
life being under never day same another know while last might us great old year off come since
against go came right used take three states himself few house use during without again place
american around however home small found thought went say part once general high upon school
every does got united left number course war until always away something fact though water less
public put think almost hand enough far took head yet government system better set told nothing
night end why called didn find look asked going later knew point next city business give group
toward young days let room president side social given present several order national possible
rather second face per among form important often things looked early white john case become
large big need four within felt along children saw best church ever least power development light
thing seemed family interest want members others mind country area done turned although open god
service problem certain kind different thus began door help sense means whole matter perhaps
itself york times law human line above name example action company hands local show whether five
history gave today either act feet across taken past quite anything having seen death experience
body word half really week free car field already information tell together college shall money
period held keep sure probably real behind miss air office making brought whose special major
heard problems ago federal became study available moment known result street economic boy reason
position change south board individual job areas society west close turn love community true
court force full seems am age cost wife future voice center wanted common necessary policy front
sometimes six girl clear further land run students provide feel party able mother music education
university child effect level stood military town short morning total outside rate figure class
art century washington north usually leave therefore evidence plan million sound top black
strong hard various says believe type value play surface soon mean near lines table modern road
tax alone red personal process situation minutes increase idea english nature private tried
private anyone river capital market data model search query document passage answer relevant
energy planet earth moon sun ocean forest mountain island bridge train station airport hospital
doctor patient teacher student library museum garden kitchen village festival weather storm rain
snow wind temperature summer winter spring autumn coffee bread cheese fruit vegetable recipe
software computer network server memory language learning machine translation security password
account email phone battery screen camera video image color price product customer service
delivery order payment bank loan interest insurance contract employee manager meeting report
budget project research science physics chemistry biology medicine disease treatment vaccine
history culture religion philosophy literature poetry novel author painting theater film actor
football basketball tennis player team season match score coach stadium championship league
"""
)

_SUFFIXES = ["s", "ed", "ing", "ly", "er", "ers", "ness", "ment", "tion", "able", "ful", "less"]

_SYLLABLES = _words(
    "ka ri to ne mo la shi vu pe zo an el im on ur ba de fi gu ho ja ke lu ma ni po qui ra su "
    "ta vi wo xa ye zu bra cle dri fro gli pra str tha ver mon dal cor pen tis gar bel nor fen"
)

_QUESTION_FORMS = [
    "what is the {a} of the {b} in {c}",
    "how does the {a} affect {b} and {c} in the {d}",
    "why do {a} and {b} change the {c} of a {d}",
    "which {a} has the most {b} for a {c} near {d}",
    "when was the first {a} built for the {b} of {c}",
    "where can i find a {a} with {b} and {c} for {d}",
    "what are the best ways to improve {a} {b} in a small {c}",
    "how many {a} are needed to support the {b} of {c}",
]


# Steepness of the word distribution. With the 24k-token benchmark tokenizer the documents
# average ~1.1 tokens per word (punctuation and digits included); see benchmarks/README.md.
ZIPF_EXPONENT = 1.05
NUMBER_RATE = 0.05  # fraction of sentences holding a number (digits are one token each)
_VOCAB_SEED = 7


@dataclass(frozen=True)
class Request:
    """One rerank request: a query and its candidate documents."""

    query: str
    documents: tuple[str, ...]


class _TextGen:
    """Zipf-weighted English-like words; a seeded ``random.Random`` drives everything."""

    def __init__(self, rng: random.Random, n_rare: int = 6000) -> None:
        self.rng = rng
        words = list(dict.fromkeys(_COMMON))
        inflected = [w + s for w in words[150:] for s in _SUFFIXES if len(w) > 3]
        # made-up names and jargon: the long tail, drawn once from a fixed seed so that the
        # tokenizer's corpus and every workload share one "language"
        vocab_rng = random.Random(_VOCAB_SEED)
        rare = []
        for _ in range(n_rare):
            word = "".join(vocab_rng.choice(_SYLLABLES) for _ in range(vocab_rng.randint(2, 4)))
            rare.append(word.capitalize() if vocab_rng.random() < 0.3 else word)
        self.vocab = words + inflected + rare
        # Zipf: weight 1/rank^ZIPF_EXPONENT over the whole list (common words first)
        self.cum = list(accumulate(1.0 / (r + 1) ** ZIPF_EXPONENT for r in range(len(self.vocab))))

    def word(self) -> str:
        return self.rng.choices(self.vocab, cum_weights=self.cum)[0]

    def sentence(self, n_words: int) -> str:
        words = [self.word() for _ in range(n_words)]
        if self.rng.random() < NUMBER_RATE:
            words.insert(self.rng.randrange(n_words), str(self.rng.randint(1, 2025)))
            words.pop()
        if n_words > 6 and self.rng.random() < 0.3:
            words[self.rng.randrange(2, n_words - 1)] += ","
        text = " ".join(words)
        return text[0].upper() + text[1:] + self.rng.choice([".", ".", ".", "?", "!"])

    def text(self, n_words: int) -> str:
        """About ``n_words`` words in sentences of 6–22 words."""
        sentences, left = [], n_words
        while left > 0:
            n = min(left, self.rng.randint(6, 22))
            if left - n < 3:  # no 1–2 word tail sentence
                n = left
            sentences.append(self.sentence(n))
            left -= n
        return " ".join(sentences)

    def query(self) -> str:
        form = self.rng.choice(_QUESTION_FORMS)
        fills = {k: self.rng.choice(self.vocab[:400]) for k in "abcd"}
        return form.format(**fills) + "?"


def corpus(seed: int = 1234, n_lines: int = 60_000) -> list[str]:
    """Tokenizer training text: documents, queries and the prompt template lines."""
    rng = random.Random(seed)
    gen = _TextGen(rng)
    lines = []
    for i in range(n_lines):
        if i % 20 == 0:
            lines.append(QWEN3_PREFIX.replace("<|im_start|>", "").replace("<|im_end|>", ""))
            lines.append(f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {gen.query()}\n<Document>: ")
            lines.append("assistant\n<think>\n\n</think>\n\nyes no yes no")
        lines.append(gen.text(rng.randint(10, 60)) if rng.random() < 0.9 else gen.query())
    return lines


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def _requests(seed: int, n_queries: int, n_docs: int, words: tuple[int, int]) -> list[Request]:
    rng = random.Random(seed)
    gen = _TextGen(rng)
    return [
        Request(
            query=gen.query(),
            documents=tuple(gen.text(rng.randint(*words)) for _ in range(n_docs)),
        )
        for _ in range(n_queries)
    ]


def w_cpu(seed: int = 0) -> list[Request]:
    """W-CPU: 4 queries × 16 documents of 60–240 words."""
    return _requests(seed, n_queries=4, n_docs=16, words=(60, 240))


def sweep_request(n_docs: int, seed: int = 1) -> Request:
    """One query × ``n_docs`` documents of 60–240 words (for docs/s vs documents per request).
    The documents of a larger N extend those of a smaller one (same seed → same prefix)."""
    rng = random.Random(seed)
    gen = _TextGen(rng)
    query = gen.query()
    return Request(query, tuple(gen.text(rng.randint(60, 240)) for _ in range(n_docs)))


def short_request(n_docs: int = 16, seed: int = 2) -> Request:
    """One query × ``n_docs`` short documents (15–40 words): the latency request."""
    return _requests(seed, n_queries=1, n_docs=n_docs, words=(15, 40))[0]


def describe(tokenizer, requests: list[Request]) -> dict:
    """Measured token statistics of ``requests`` under the Qwen3-Reranker prompt."""
    pair_lens, shared, doc_words, doc_tokens = [], [], [], []
    for req in requests:
        ids = [qwen3_pair_ids(tokenizer, req.query, d) for d in req.documents]
        common = len(ids[0])
        for seq in ids[1:]:
            n = 0
            while n < min(common, len(seq)) and seq[n] == ids[0][n]:
                n += 1
            common = n
        shared.append(common)
        pair_lens.extend(len(s) for s in ids)
        for d in req.documents:
            doc_words.append(len(d.split()))
            doc_tokens.append(len(tokenizer.encode(" " + d, add_special_tokens=False)))
    return {
        "requests": len(requests),
        "pairs": len(pair_lens),
        "tokens_per_pair": statistics.fmean(pair_lens),
        "min_pair_tokens": min(pair_lens),
        "max_pair_tokens": max(pair_lens),
        "shared_prefix_tokens": statistics.fmean(shared),
        "total_tokens": sum(pair_lens),
        "unshared_tokens": sum(pair_lens)
        - sum(s * len(r.documents) for s, r in zip(shared, requests, strict=True)),
        "words_per_doc": statistics.fmean(doc_words),
        "tokens_per_word": sum(doc_tokens) / sum(doc_words),
        "pair_lens": pair_lens,
        "shared_per_request": shared,
        "docs_per_request": [len(r.documents) for r in requests],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the measured W-CPU token statistics.")
    parser.add_argument("--model", required=True, help="checkpoint dir (its tokenizer is used)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    stats = describe(tok, w_cpu())
    for key, value in stats.items():
        if not isinstance(value, list):
            print(f"{key:>22}: {value:.1f}" if isinstance(value, float) else f"{key:>22}: {value}")


if __name__ == "__main__":
    main()

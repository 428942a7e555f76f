"""Write a tiny random-weight llama-architecture GGUF model that llama.cpp can load: the model
tests/test_llamacpp.py serves with llama-cpp-python (tox -e llamacpp). Started from the shared
real-backends recipe's make_tiny_gguf.py; the answers are gibberish, the server is the real one.

2 layers, n_embd 64, 4 heads (head dim 16), n_ff 128, context 512, F32 weights.
Tokenizer: SentencePiece-style ("llama" / SPM) with <unk>, <s>, </s>, the 256 byte tokens
<0x00>..<0xFF>, the space marker and letters/digits/punctuation, plus whole-word pieces
("\u2581word", with all their prefixes, as SPM merging needs) for a list of English words, so
such words cost one token each; anything else falls back to characters and bytes.

Usage: python -m tests.realbackend.tiny_gguf [OUT] [--words FILE]  (default OUT tiny.gguf)
With --words vast_vespa/benchmarks/words.txt (the benchmark's word list: 12,434 tokens, 7 MB;
what :func:`write` uses by default) the shipped OpenAI benchmark's prompts cost about one token
per word. Needs gguf and numpy (installed by tox -e llamacpp only).
"""

from __future__ import annotations

import argparse
import string
from importlib.resources import files

import numpy as np
from gguf import GGUFWriter, TokenType

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX = 512
SPACE = "\u2581"  # SentencePiece's word-boundary marker

COMMON = """the of and to a in is it you that he was for on are with as I his they be at one have
this from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so these her
long make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off
need house picture try us again animal point mother world near build self earth father hello hi
story tell explain detailed helpful assistant answer request structured explanation user system""".split()


def build_vocab(extra_words: list[str]) -> tuple[list[str], list[float], list[int]]:
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    seen = set(tokens)

    def add(piece: str, score: float) -> None:
        if piece and piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(TokenType.NORMAL)
            scores.append(score)

    # single characters (lowest scores: the SPM merger prefers longer pieces with higher scores)
    add(SPACE, -1000.0)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        add(ch, -900.0)
        add(SPACE + ch, -800.0)
    # whole words with the leading space marker, and without it (start of text). llama.cpp's
    # SPM tokenizer merges adjacent pieces pairwise, so every prefix of a word piece must be a
    # token too; longer pieces get higher scores so they are merged first.
    for w in dict.fromkeys(COMMON + extra_words):
        for piece in (SPACE + w, w):
            for end in range(2, len(piece) + 1):
                add(piece[:end], -100.0 + end)
    return tokens, scores, [int(t) for t in types]


def benchmark_words() -> list[str]:
    """The shipped benchmark's word list, so that its prompts cost about a token a word."""
    return files("vast_vespa.benchmarks").joinpath("words.txt").read_text("utf-8").split()


def write(out: str, extra: list[str], seed: int = 1234) -> str:
    """Write the model to ``out`` (deterministic for a seed); returns a one-line summary."""
    tokens, scores, types = build_vocab(extra)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = GGUFWriter(out, "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)  # ALL_F32

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    # numpy shape is the reverse of ggml's ne: token_embd ne = [n_embd, n_vocab]
    token_embd = rand(n_vocab, N_EMBD, scale=1.0)
    output = rand(n_vocab, N_EMBD, scale=0.5)
    # Keep random sampling away from <unk>, <s> and the byte tokens: a lone byte such as <0xE2>
    # is incomplete UTF-8, which llama-cpp-python's streaming holds back (and re-detokenizes at
    # every later step), so a stream stalls. Every embedding carries a constant +5 in dimension
    # 0, which survives the small random layers and the final RMS norm; normal tokens (and
    # </s>) read it with +3, the unwanted ones with -3: about 25 logits apart.
    token_embd[:, 0] = 5.0
    unwanted = [i for i, t in enumerate(types) if t in (TokenType.UNKNOWN, TokenType.BYTE)] + [1]
    output[:, 0] = 3.0
    output[unwanted, 0] = -3.0
    w.add_tensor("token_embd.weight", token_embd)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", output)
    head_dim = N_EMBD // N_HEAD
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rand(N_HEAD * head_dim, N_EMBD, scale=0.1))
        w.add_tensor(p + "attn_k.weight", rand(N_HEAD_KV * head_dim, N_EMBD, scale=0.1))
        w.add_tensor(p + "attn_v.weight", rand(N_HEAD_KV * head_dim, N_EMBD, scale=0.1))
        w.add_tensor(p + "attn_output.weight", rand(N_EMBD, N_HEAD * head_dim, scale=0.1))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD, scale=0.1))
        w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD, scale=0.1))
        w.add_tensor(p + "ffn_down.weight", rand(N_EMBD, N_FF, scale=0.1))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f"wrote {out}: {n_vocab} tokens, {N_LAYER} layers, n_embd {N_EMBD}, n_ctx {N_CTX}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="tiny.gguf")
    parser.add_argument("--words", help="file with more whole-word tokens (one per line)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    extra: list[str] = []
    if args.words:
        with open(args.words, encoding="utf-8") as f:
            extra = [w.strip() for w in f if w.strip()]
    print(write(args.out, extra, args.seed))


if __name__ == "__main__":
    main()

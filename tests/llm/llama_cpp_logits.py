"""Every position's logits of token windows under llama.cpp (run with the llama-cpp-python environment's Python).

    python llama_cpp_logits.py MODEL.gguf OUT.npy WINDOWS.npy [TEXT]

``WINDOWS.npy`` holds int token ids ``(windows, length)``; ``OUT.npy`` gets float32 logits ``(windows, length,
vocab)``. Each window is one batch into ``llama_decode`` on an empty cache, with an fp32 KV cache and flash attention
off: llama.cpp's default f16 cache and its CPU flash attention round to fp16, which would add their own error to the
comparison. With a ``TEXT`` file, llama.cpp's tokens of it (no special tokens added) go to ``OUT.tokens.npy``.
"""

from __future__ import annotations

import sys

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0


def tokenize(model: llama_cpp.llama_model_p, text: str) -> np.ndarray:
    data = text.encode()
    tokens = (llama_cpp.llama_token * (len(data) + 1))()
    count = llama_cpp.llama_tokenize(llama_cpp.llama_model_get_vocab(model), data, len(data), tokens, len(tokens),
                                     False, False)  # fmt: skip
    if count < 0:
        raise SystemExit("llama_tokenize failed")
    return np.array(tokens[:count], dtype=np.int64)


def main() -> None:
    model_path, out, windows_path, *text = sys.argv[1:]
    windows = np.load(windows_path)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = windows.shape[1]
    params.type_k = params.type_v = GGML_TYPE_F32
    params.no_perf = True
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    logits = np.empty((*windows.shape, vocab), dtype=np.float32)
    for index, window in enumerate(windows.tolist()):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch = llama_cpp.llama_batch_init(len(window), 0, 1)
        for position, token in enumerate(window):
            batch.token[position], batch.pos[position] = token, position
            batch.n_seq_id[position], batch.seq_id[position][0], batch.logits[position] = 1, 0, 1
        batch.n_tokens = len(window)
        status = llama_cpp.llama_decode(ctx, batch)
        llama_cpp.llama_batch_free(batch)
        if status != 0:
            raise SystemExit(f"llama_decode failed ({status})")
        logits[index] = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(window), vocab))
    np.save(out, logits)
    if text:
        with open(text[0], encoding="utf-8") as file:
            np.save(out.removesuffix(".npy") + ".tokens.npy", tokenize(model, file.read()))


if __name__ == "__main__":
    main()

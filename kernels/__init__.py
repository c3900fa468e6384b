"""lmdisagg.kernels: compute kernels, each beside its plain-PyTorch reference (``*_ref``).

    kv_write.py          Triton: scatter new K/V into their paged-cache slots
    decode_attention.py  Triton: paged flash-decoding attention with GQA (one query per sequence)
    prefill_attention.py Triton: paged causal attention of prefill tokens over their whole context
                         (split-K, GQA), what the engine's prefill CUDA graphs run
    _paged.py            the key-tile step both paged attention kernels share
    rms_norm.py          Triton: residual add + RMSNorm in one pass
    rope.py              Triton: rotary embedding in place (q and k heads together)
    activation.py        Triton: SwiGLU over the fused gate_up projection
    cpu_linear.py        oneDNN: bf16 linear layers with weights packed once (CPU)

The engine uses the Triton kernels on CUDA; tests run them on CPU through Triton's interpreter
(TRITON_INTERPRET=1). Importing this package imports nothing; each module imports Triton.
"""

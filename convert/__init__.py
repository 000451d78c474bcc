"""Converters from other projects' checkpoints into argen weights files (safetensors + config).

    python -m convert.llamagen vq  vq_ds16_c2i.pt out=weights/llamagen/vq_ds16_c2i.safetensors
    python -m convert.llamagen gpt c2i_XL_384.pt image_size=384 \
        tokenizer=weights/llamagen/vq_ds16_c2i.safetensors out=weights/llamagen/c2i_XL_384.safetensors

Foreign checkpoints are read with `torch.load(weights_only=True)` and mapped by explicit key
tables; unknown or missing keys are errors that list them.
"""

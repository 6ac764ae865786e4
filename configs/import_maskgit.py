"""Import of MaskGIT's released checkpoints into our workdirs (jobs/import_maskgit.py).

  python run.py --config=configs/import_maskgit.py:256 --workdir=runs/maskgit_official_256 \
      --config.tokenizer_path=tokenizer_imagenet256_checkpoint \
      --config.maskgit_path=maskgit_imagenet256_checkpoint

writes WORKDIR/tokenizer (a tokenizer run) and WORKDIR/maskgit (a MaskGIT run whose tokens are
that tokenizer's), then sample with configs/maskgit_official.py. Sizes are the official
`maskgit_class_cond_config` / `vqgan_config` (PyPI package `maskgit`); 512 differs only in the
image size (32x32 tokens, 1025 position embeddings). `tiny` is CPU-sized (tests).
"""

from ml_collections import ConfigDict


def get_config(arg="256"):
    config = ConfigDict(
        dict(
            job="import_maskgit",
            image_size=256,
            tokenizer_path="",  # tokenizer_imagenet{256,512}_checkpoint (msgpack)
            maskgit_path="",  # maskgit_imagenet{256,512}_checkpoint (msgpack)
            num_classes=1000,  # num_class
            dtype="float32",  # compute dtype saved in both configs (official inference: float32)
            tokenizer=dict(  # vqgan_config.vqvae
                filters=128,
                channel_multipliers=(1, 1, 2, 2, 4),
                num_res_blocks=2,
                embedding_dim=256,
                codebook_size=1024,
            ),
            transformer=dict(  # maskgit_class_cond_config.transformer
                width=768,  # num_embeds
                depth=24,  # num_layers
                heads=16,  # num_heads
                mlp_dim=3072,  # intermediate_size
                dropout=0.1,  # dropout_rate (hidden and attention probabilities)
            ),
            mesh=dict(data=-1, fsdp=1, model=1),
        )
    )
    if arg == "512":
        config.image_size = 512
    elif arg == "tiny":
        # 32x32 images -> 8x8 tokens (f4), 64 codes of 16 dims, 10 classes, 2 layers.
        config.update(image_size=32, num_classes=10)
        config.tokenizer.update(
            filters=32, channel_multipliers=(1, 1, 2), num_res_blocks=1, embedding_dim=16
        )
        config.tokenizer.codebook_size = 64
        config.transformer.update(width=32, depth=2, heads=2, mlp_dim=64)
    elif arg != "256":
        raise ValueError(
            f"unknown variant {arg!r} of configs/import_maskgit.py; use 256, 512, tiny"
        )
    return config

"""Training (``tools/train.py``): config, data, sampler, forward, losses, discriminator, optimizer, EMA, checkpoints."""

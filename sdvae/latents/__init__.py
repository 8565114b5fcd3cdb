"""Latents: scaling, latents files, the ``encode-dataset`` job and its on-disk dataset, statistics, previews."""

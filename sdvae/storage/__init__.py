"""Where sdvae reads and writes: local paths or fsspec URLs (``s3://``, ``gs://``, ``https://``, ``hf://``).

:mod:`sdvae.storage.urls` handles references as strings (no I/O); :mod:`sdvae.storage.files` does the I/O,
with atomic writes and one-line :class:`sdvae.errors.UserError` messages that never show a secret.
"""

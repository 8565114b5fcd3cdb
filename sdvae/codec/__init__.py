"""Encoding and decoding images of any size: the ``Codec`` and exact tiling."""

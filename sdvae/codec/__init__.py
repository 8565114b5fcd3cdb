"""Encoding and decoding images of any size: the ``Codec`` and exact tiling."""

TILE_MODES = ("auto", "on", "off")  # --tile: tile above a size, always, never

"""The benchmark kit behind ``tools/bench.py``: the pieces every benchmark shares, each written once.

``inputs`` synthetic and folder images, ``timing`` timed loops (device sync, warm-up), ``memory`` peak
RSS / CUDA max allocated, ``children`` fresh-process runs, ``flops`` FLOP counting and device peaks,
``steps`` the training-step recipes (ours and each peer), ``gpu`` the checks of ``bench.py gpu``,
``report`` tables, JSON and PSNR. Importing the package loads no torch; each module imports it lazily
or at its top only where every caller needs it.
"""

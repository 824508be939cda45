"""The values of ``SparsityConfig.compute`` (kept free of torch so the config imports it cheaply)."""

#: ``masked``: dense tensors with masks; ``sparse``: CPU kernels over the active weights only;
#: ``auto``: sparse where a short timing at the start finds the kernels faster (see :mod:`.compute`).
COMPUTE_MODES = ("masked", "sparse", "auto")

"""CPU sparse kernels: layers computed over their active weights only (``compute="sparse"``)."""

"""One module per op: its Triton kernels, their launchers, the autograd function, the PyTorch
reference and the functional form. The public functions are re-exported by ``kis_kernels``
(``kis_kernels.rms_norm`` is always the function; this package's ``rms_norm`` is its module)."""

"""Helpers shared by the tests and the benchmarks: free ports and waiting (``net``), servers in subprocesses
(``servers``) and test doubles for the layers above the model (``fakes``).

``net`` and ``servers`` import neither pytest nor the package's heavy modules, so benchmarks can use them.
"""

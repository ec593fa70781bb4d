"""Local Triton backends for `make run` and the tests, and a Triton model repository for GPU deployments.

`backends.example` is the example model in pure numpy, `backends.local` starts real Triton servers (through
PyTriton, on the CPU), one process per model version.
"""

"""Ahead-of-time compilation for TPU and GPU targets on a host without them (`python -m bagel_jax.aot`).

`targets` names abstract devices (TPU topologies through libtpu, GPUs through the CUDA plugin's
target descriptions), `steps` builds the train / denoising / decode programs on a mesh of them,
`analysis` reads memory, kernel calls, collectives and cost from a compiled program, and
`runner` ties them into the command line.  Needs `pip install -e '.[aot]'`.
"""

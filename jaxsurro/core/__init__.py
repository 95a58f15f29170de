"""The pure math of jaxsurro, no I/O: reservoir, Breed, model, training step, sampling.

Every function here is a pure function of its arguments (JAX or NumPy), jittable where it
is JAX; jit at the call site. Nothing in ``core`` touches sockets, MPI, processes or files.
"""

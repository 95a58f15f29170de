"""The pure math of jaxsurro, no I/O: reservoir, Breed, model, training step, sampling, sample layout.

Every function here is a pure function of its arguments (JAX or NumPy), jittable where it
is JAX; jit at the call site. Nothing in ``core`` touches sockets, MPI, processes or files,
and nothing imports the rest of the project (docs/architecture.md, "Four sides"; checked by
tests/test_import_graph.py).
"""

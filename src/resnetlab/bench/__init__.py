"""Benchmarks: the training step (:mod:`.train`), the input pipeline against it (:mod:`.pipeline`) and the
deployment variants of a checkpoint (:mod:`.infer`). They measure the library's own code paths and sit above the
packages they measure."""

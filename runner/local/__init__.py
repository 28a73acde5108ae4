"""The FireTitan-compatible local service: a real model on loopback.

Import-light on purpose: `catalogue` is plain data; the torch-backed parts live
in `engine` (Trainer, Sampler and the data types) and `model`, imported only
where needed.
"""

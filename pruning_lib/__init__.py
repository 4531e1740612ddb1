"""pruning_lib: the library behind "Pruning, Reproduced".

Modules: ``data`` (datasets by name), ``models`` (model registry), ``masks`` (unstructured masks),
``gates`` and ``compact`` (structured channel gates and physical removal), ``train`` (the one training
loop), ``metrics`` (parameters and FLOPs), ``runs`` (configs, hashes, cached results), ``claims``
(the claims ledger), ``plotting`` (the book's figure style), and one module per chapter.
"""
__version__ = "0.1.0"

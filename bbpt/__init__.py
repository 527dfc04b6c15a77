"""bbpt: tune soft and discrete prompts for language models, by gradient or derivative-free search.

Heavy libraries (torch, transformers, cma, nevergrad) are imported lazily inside the modules that need them,
so importing :mod:`bbpt` and running ``bbpt --help`` stay instant.
"""

from bbpt.errors import (BackendError, BbptError, ConfigError, DataError, ObjectiveError, OptimizerError,
                         StorageError, StudyError)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BbptError",
    "ConfigError",
    "DataError",
    "ObjectiveError",
    "OptimizerError",
    "StorageError",
    "StudyError",
    "__version__",
]

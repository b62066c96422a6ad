"""The Python API's old address: it moved to `c2c.app.api` in 0.3.0. `from c2c import
SpeculativePipeline` is the import to use; this module keeps `from c2c.api import
SpeculativePipeline` working, with a DeprecationWarning."""

import warnings

from .app.api import SpeculativePipeline  # noqa: F401

warnings.warn("c2c.api moved to c2c.app.api in 0.3.0: use `from c2c import SpeculativePipeline`", DeprecationWarning,
              stacklevel=2)

__all__ = ["SpeculativePipeline"]

"""dpmem: what neural networks memorize, and what differential privacy costs.

The repository's folders install as ``dpmem.bench`` (data, pipeline, store, estimators, reports,
the command line), ``dpmem.models`` (architectures and training engines) and ``dpmem.privacy``
(accounting, bounds, audits). This module is the public Python API; everything else is private
by convention.
"""
from __future__ import annotations

__version__ = "0.2.0"

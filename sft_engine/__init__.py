"""sft_engine: the pure core of the SFT pipeline (no orchestration imports).

Modules map one-to-one to concerns: ``config`` (validated stage configs), ``curate``
(Polars curation), ``chat`` (templates and loss masks), ``packing`` (best-fit decreasing),
``data`` (packed shards and batches), ``train`` (DeepSpeed loop), ``evaluate``.
"""

__version__ = "0.1.0"

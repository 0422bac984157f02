"""Offline batches: the OpenAI Files and Batch APIs, orchestrated by arq.

- ``input``: the Batch input format, line by line (shared by the CLI and the orchestrator).
- ``files``: files in Redis (``FileStore``), written and read in slices, never whole.
- ``store``: batch records (``BatchStore``) and the OpenAI views of batches and files.
- ``orchestrator``: one arq job per batch, in lease-fenced slices; ``worker``: its
  ``WorkerSettings`` and cron.
- ``client`` and ``cli``: ``tokenfleet enqueue`` and ``tokenfleet batch ...`` over HTTP.
"""

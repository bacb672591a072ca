"""CI for GPU hosts: per-GPU baselines and the regression gate (``baselines``), shard and worker
selection (``sharding``), and the runner that ``.ci/gpu`` and the GPU workflow call (``runner``)."""

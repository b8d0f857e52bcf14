"""The commands, one file each (``mlx_kvq.generate``, ``summarize``, ``cache_prompt``,
``plan``, ``eval``, ``bench``), and what they share: the KV flags (``args``) and the
cache report (``report``)."""

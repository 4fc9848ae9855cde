"""vLLM-side code: a directory put on ``PYTHONPATH`` of the vLLM server (its own venv), so
``alignkit_vllm_worker`` imports there as a top-level module without importing alignkit."""

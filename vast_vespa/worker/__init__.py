"""The worker: what runs on the GPU host in front of the backend."""

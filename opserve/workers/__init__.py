"""Worker processes: each hosts one model version; tensors cross in shared memory."""

"""Reading and writing checkpoints: safetensors headers, model folders, hub resolution, sharded streaming output."""

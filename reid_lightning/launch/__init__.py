"""Process launching: DDP children per Hydra multirun job, and the multirun summary callback."""

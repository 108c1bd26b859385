"""Lightning wiring: the ReID LightningModule, optimizer + LR schedule, hooks and the runner."""

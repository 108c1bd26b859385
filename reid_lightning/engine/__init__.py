"""Lightning wiring: the ReID LightningModule, optimizer + LR schedule, fast-reid hooks, logger hyper-parameters."""

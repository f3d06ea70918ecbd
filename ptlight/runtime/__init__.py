"""What runs around the LightningModule: devices and precision, the FSDP strategy, callbacks,
the run directory (logs, locks, resume) and the checks made before any weights load."""

"""Platform: config, engines, checkpoints, metrics — everything between the math and the cluster."""

"""Running the engine on a Ray cluster: commands plugged into ``modulora`` (sweeps, calibration)."""

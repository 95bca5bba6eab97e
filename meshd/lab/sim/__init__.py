"""The mesh simulator: links, device profiles, the discrete-event simulation, calibration and ``meshd simulate``."""

"""The mesh simulator: links, device profiles, the discrete-event engine, calibration and ``meshd simulate``."""

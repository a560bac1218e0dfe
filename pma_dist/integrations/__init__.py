"""Engine integrations: DeepSpeed (a config flag) and Accelerate (one line after prepare)."""

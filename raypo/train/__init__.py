"""One training run: config, set-up (cached data, reference outputs, base model), the loop,
evaluation; in-process for one worker, Ray Train for several."""

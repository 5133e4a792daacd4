"""The parallel core: models, parallel layers, data, checkpoints. Pure torch; knows nothing of RL, Ray or vLLM."""

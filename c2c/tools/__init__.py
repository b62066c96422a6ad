"""The tools: fuser training and its data, synthetic real-shape timing."""
